//! Amperity: a JWT bearer access token for one tenant, on one of three hosts.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use secrecy::ExposeSecret;

use zeroize::Zeroizing;

use super::validation::{classify, Answer, ProbeHeader, Reading, Validation};
use super::{Checked, FieldSpec, Params, ProviderSpec, Rejection, Route, Secrets, ValidationSpec};

/// The API version every request must name.
const API_VERSION: &str = "2024-04-01";

pub static SPEC: ProviderSpec = ProviderSpec {
    name: "amperity",
    display_name: "Amperity",
    secrets: &[FieldSpec::required(
        "access_token",
        "an API access token (a JWT) from the tenant's API keys page",
        8192,
    )],
    params: &[
        FieldSpec::required("tenant_id", "the tenant id, sent as Amperity-Tenant", 63),
        FieldSpec::choice(
            "host",
            "app (AWS), tenant ({tenant_id}.amperity.com, Azure) or apse2 (Australia)",
            &["app", "tenant", "apse2"],
            "app",
        ),
    ],
    check,
    auth,
    validation: ValidationSpec {
        base_urls: &[
            ("app", "https://app.amperity.com"),
            ("tenant", "https://{tenant_id}.amperity.com"),
            ("apse2", "https://app-aws-apse2.amperity.com"),
        ],
        base_url_param: "host",
        wrong_region_on: &[],
        // Amperity allows 10 requests/s per tenant.
        max_concurrent: 8,
        path,
        interpret,
    },
    routes: &[Route::get("/api/segments"), Route::get("/api/campaigns")],
};

/// All three headers Amperity requires on every call.
fn auth(secrets: &Secrets, params: &Params) -> Vec<ProbeHeader> {
    let token = secrets
        .get("access_token")
        .map(|s| s.expose_secret())
        .unwrap_or_default();
    let tenant = params.get("tenant_id").cloned().unwrap_or_default();
    vec![
        ProbeHeader {
            name: "authorization",
            value: Zeroizing::new(format!("Bearer {token}")),
            sensitive: true,
        },
        ProbeHeader {
            name: "amperity-tenant",
            value: Zeroizing::new(tenant),
            sensitive: false,
        },
        ProbeHeader {
            name: "api-version",
            value: Zeroizing::new(API_VERSION.to_owned()),
            sensitive: false,
        },
    ]
}

fn path(_params: &Params) -> String {
    // Never with_total=true: it is expensive on Amperity's side.
    "/api/segments?limit=1".to_owned()
}

fn interpret(answer: &Answer, params: &Params) -> Validation {
    let reading = Reading {
        // 403: a valid token without the DataGrid Operator role.
        forbidden_is_permission: true,
        not_found_is_permission: false,
    };
    // There is no tenant-info endpoint: the tenant id is the name.
    let tenant = params.get("tenant_id").cloned().unwrap_or_default();
    classify(answer, &reading, "Amperity", |json| {
        json.get("data")
            .is_some_and(serde_json::Value::is_array)
            .then_some(tenant)
    })
}

fn check(secrets: &Secrets, params: &Params) -> Result<Checked, Rejection> {
    let tenant = params
        .get("tenant_id")
        .map(String::as_str)
        .unwrap_or_default();
    // The tenant id may become a host name label: keep it to one.
    if !super::is_host_label(tenant) {
        return Err(Rejection::Invalid(
            "parameter `tenant_id` may hold only lowercase letters, digits and inner hyphens"
                .into(),
        ));
    }
    let token = secrets
        .get("access_token")
        .map(|s| s.expose_secret())
        .unwrap_or_default();
    let expires_at = jwt_expiry(token)
        .ok_or_else(|| {
            Rejection::Invalid(
                "field `access_token` is not a JWT (header.payload.signature)".into(),
            )
        })?
        .map_err(|OutOfRange| {
            Rejection::Invalid(format!(
                "field `access_token` has an `exp` claim past the year 9999 (at most \
                 {MAX_EXP}); create a token with a real expiry"
            ))
        })?;
    if let Some(at) = expires_at {
        if at <= SystemTime::now() {
            return Err(Rejection::Precondition(
                "field `access_token` has expired (its `exp` has passed); create a new token"
                    .into(),
            ));
        }
    }
    Ok(Checked { expires_at })
}

/// The latest `exp` accepted: 9999-12-31T23:59:59Z. Anything later is no
/// real expiry, and would overflow time arithmetic further on.
const MAX_EXP: u64 = 253_402_300_799;

/// An `exp` past [`MAX_EXP`].
#[derive(Debug, PartialEq, Eq)]
struct OutOfRange;

/// The `exp` claim of a JWT, read without checking the signature: the vault is
/// not the token's audience. `None` if this is not a JWT; `Some(Ok(None))` if
/// it carries no (numeric) `exp`.
fn jwt_expiry(token: &str) -> Option<Result<Option<SystemTime>, OutOfRange>> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    if header.is_empty() || signature.is_empty() {
        return None;
    }
    let engine = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header: serde_json::Value = serde_json::from_slice(&engine.decode(header).ok()?).ok()?;
    header.as_object()?;
    // The payload may carry personal data; it is parsed and dropped, never logged.
    let claims: serde_json::Value = serde_json::from_slice(&engine.decode(payload).ok()?).ok()?;
    let Some(exp) = claims.as_object()?.get("exp") else {
        return Some(Ok(None));
    };
    if !exp.is_number() {
        return Some(Ok(None));
    }
    // A number that is not a u64 (negative, fractional, huge) is out of range
    // unless it is a small non-negative fraction.
    let secs = match exp.as_u64() {
        Some(secs) => secs,
        None => match exp.as_f64() {
            Some(f) if (0.0..=MAX_EXP as f64).contains(&f) => f as u64,
            _ => return Some(Err(OutOfRange)),
        },
    };
    if secs > MAX_EXP {
        return Some(Err(OutOfRange));
    }
    Some(Ok(Some(UNIX_EPOCH + Duration::from_secs(secs))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> String {
        let e = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.{}",
            e.encode(r#"{"alg":"RS256","typ":"JWT"}"#),
            e.encode(claims),
            e.encode("signature-bytes")
        )
    }

    fn run(token: &str, tenant: &str) -> Result<Checked, Rejection> {
        let secrets = Secrets::from([("access_token".to_owned(), token.into())]);
        let params = Params::from([("tenant_id".to_owned(), tenant.to_owned())]);
        check(&secrets, &params)
    }

    #[test]
    fn reads_exp_into_expires_at() {
        let checked = run(&jwt(r#"{"sub":"x","exp":4102444800}"#), "acme").unwrap();
        assert_eq!(
            checked.expires_at,
            Some(UNIX_EPOCH + Duration::from_secs(4_102_444_800))
        );
    }

    #[test]
    fn an_exp_out_of_range_is_invalid_not_a_panic() {
        for exp in [
            "9223372036854775808",
            "18446744073709551615",
            "1e300",
            "-1",
            "253402300800",
        ] {
            assert!(
                matches!(
                    run(&jwt(&format!(r#"{{"exp":{exp}}}"#)), "acme"),
                    Err(Rejection::Invalid(_))
                ),
                "{exp}"
            );
        }
    }

    #[test]
    fn token_without_exp_has_unknown_expiry() {
        assert_eq!(
            run(&jwt(r#"{"sub":"x"}"#), "acme").unwrap().expires_at,
            None
        );
    }

    #[test]
    fn rejects_expired_token_as_precondition() {
        assert!(matches!(
            run(&jwt(r#"{"exp":1000}"#), "acme"),
            Err(Rejection::Precondition(_))
        ));
    }

    #[test]
    fn rejects_what_is_not_a_jwt() {
        for bad in [
            "plain-token-value-123",
            "a.b",
            "a.b.c.d",
            "..",
            "eyJ.eyJ.sig",
        ] {
            assert!(
                matches!(run(bad, "acme"), Err(Rejection::Invalid(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn rejects_tenant_that_is_not_a_host_label() {
        for bad in ["Acme", "acme.evil.com", "-acme", "a/b", "acme-"] {
            assert!(run(&jwt("{}"), bad).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_token_text_is_parsed_without_panic(token in "\\PC{0,200}") {
            let _ = jwt_expiry(&token);
        }

        #[test]
        fn any_payload_is_parsed_without_panic(payload: Vec<u8>) {
            let e = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
            let token = format!("{}.{}.sig", e.encode(r#"{"alg":"RS256"}"#), e.encode(&payload));
            let _ = jwt_expiry(&token);
        }
    }
}
