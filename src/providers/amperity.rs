//! Amperity: a JWT bearer access token for one tenant, on one of three hosts;
//! or OAuth client credentials, from which the vault mints its own tokens.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use secrecy::ExposeSecret;

use zeroize::Zeroizing;

use secrecy::SecretString;

use super::validation::{classify, printable, Answer, ProbeHeader, Reading, Validation, Verdict};
use super::{
    Checked, FieldSpec, MintRequest, MintSpec, Minted, MonitorBudget, Params, ProviderSpec,
    QuotaUnit, Rate, Rejection, Route, Secrets, ValidationSpec,
};

/// The API version every request must name.
const API_VERSION: &str = "2024-04-01";

pub static SPEC: ProviderSpec = ProviderSpec {
    name: "amperity",
    display_name: "Amperity",
    secrets: &[
        FieldSpec::optional(
            "access_token",
            "with auth = token (the default): an API access token (a JWT) from the tenant's \
             API keys page",
            8192,
        ),
        FieldSpec::optional(
            "client_secret",
            "with auth = client_credentials: the API key's OAuth client secret",
            1024,
        ),
    ],
    params: &[
        FieldSpec::required("tenant_id", "the tenant id, sent as Amperity-Tenant", 63),
        FieldSpec::choice(
            "host",
            "app (AWS), tenant ({tenant_id}.amperity.com, Azure) or apse2 (Australia)",
            &["app", "tenant", "apse2"],
            "app",
        ),
        FieldSpec::choice(
            "auth",
            "token (a stored access token) or client_credentials (the vault mints short-lived \
             tokens from client_id and client_secret)",
            &["token", "client_credentials"],
            "token",
        ),
        FieldSpec::optional(
            "client_id",
            "with auth = client_credentials: the API key's OAuth client id",
            256,
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
        permissions: None,
    },
    routes: &[Route::get("/api/segments"), Route::get("/api/campaigns")],
    mint: Some(&MINT),
    monitor: MonitorBudget {
        quota: "10 requests per second per tenant",
        unit: QuotaUnit::Param("tenant_id"),
        concurrent: 1,
        // A tenth: one request a second.
        rate: Some(Rate {
            requests: 1,
            per: Duration::from_secs(1),
        }),
    },
};

/// Client credentials: `POST https://{tenant}.amperity.com/api/v0/oauth2/token`
/// (PROVIDERS.md, "Amperity").
static MINT: MintSpec = MintSpec {
    applies: mints,
    base_url_key: "tenant",
    request: mint_request,
    read: read_minted,
    token_field: "access_token",
};

const TOKEN_PATH: &str = "/api/v0/oauth2/token";
/// A minted token's lifetime when the answer does not say (Amperity: 1 hour).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

fn mints(params: &Params) -> bool {
    params
        .get("auth")
        .is_some_and(|a| a == "client_credentials")
}

fn mint_request(secrets: &Secrets, params: &Params) -> MintRequest {
    let secret = secrets
        .get("client_secret")
        .map(|s| s.expose_secret())
        .unwrap_or_default();
    let client_id = params.get("client_id").map_or("", String::as_str);
    let tenant = params.get("tenant_id").cloned().unwrap_or_default();
    let body = Zeroizing::new(
        url::form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "client_credentials")
            .append_pair("client_id", client_id)
            .append_pair("client_secret", secret)
            .finish()
            .into_bytes(),
    );
    let header = |name, value: String| ProbeHeader {
        name,
        value: Zeroizing::new(value),
        sensitive: false,
    };
    MintRequest {
        path: TOKEN_PATH,
        headers: vec![
            header(
                "content-type",
                "application/x-www-form-urlencoded".to_owned(),
            ),
            header("accept", "application/json".to_owned()),
            // Documented as X-Amperity-Tenant for the token endpoint, and as
            // Amperity-Tenant for the API: both are sent.
            header("amperity-tenant", tenant.clone()),
            header("x-amperity-tenant", tenant),
        ],
        body,
    }
}

/// `{"access_token": "...", "expires_in": 3600, "token_type": "Bearer"}`.
fn read_minted(answer: &Answer) -> Result<Minted, Validation> {
    let refused = |why: &str| {
        Validation::answered(
            Verdict::Rejected,
            answer.status,
            format!("Amperity's token endpoint refused the client credentials ({why})"),
        )
    };
    match answer.status {
        200..=299 => {}
        // OAuth: 400 invalid_client / invalid_grant, 401 invalid_client.
        400 | 401 => {
            let error = answer
                .json()
                .and_then(|j| j.get("error")?.as_str().map(printable))
                .unwrap_or_else(|| format!("HTTP {}", answer.status));
            return Err(refused(&error));
        }
        _ => {
            let reading = Reading {
                forbidden_is_permission: true,
                not_found_is_permission: false,
            };
            return Err(classify(
                answer,
                &reading,
                "Amperity's token endpoint",
                |_| None,
            ));
        }
    }
    let unexpected = || {
        Validation::answered(
            Verdict::UnexpectedResponse,
            answer.status,
            "Amperity's token endpoint answered without an access token",
        )
    };
    let json = answer.json().ok_or_else(unexpected)?;
    let token = json
        .get("access_token")
        .and_then(serde_json::Value::as_str)
        .filter(|t| !t.is_empty() && t.len() <= 8192)
        .ok_or_else(unexpected)?;
    if json
        .get("token_type")
        .and_then(serde_json::Value::as_str)
        .is_some_and(|t| !t.eq_ignore_ascii_case("bearer"))
    {
        return Err(unexpected());
    }
    // At least a minute, at most a day, whatever the answer claims.
    let lifetime = json
        .get("expires_in")
        .and_then(serde_json::Value::as_u64)
        .map_or(DEFAULT_LIFETIME, Duration::from_secs)
        .clamp(Duration::from_secs(60), Duration::from_secs(24 * 3600));
    Ok(Minted {
        token: SecretString::from(token.to_owned()),
        lifetime,
    })
}

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
    if mints(params) {
        return check_client_credentials(secrets, params);
    }
    if secrets.contains_key("client_secret") || params.contains_key("client_id") {
        return Err(Rejection::Invalid(
            "`client_secret` and `client_id` go with auth = client_credentials; with auth = \
             token (the default) store `access_token` alone"
                .into(),
        ));
    }
    let Some(token) = secrets.get("access_token").map(|s| s.expose_secret()) else {
        return Err(Rejection::Invalid(
            "field `access_token` is missing (or store client credentials with \
             auth = client_credentials)"
                .into(),
        ));
    };
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

/// The client-credentials shape: `client_secret` and `client_id`, no token.
fn check_client_credentials(secrets: &Secrets, params: &Params) -> Result<Checked, Rejection> {
    if secrets.contains_key("access_token") {
        return Err(Rejection::Invalid(
            "with auth = client_credentials the vault mints its own tokens: store \
             `client_secret` (and the param `client_id`), not `access_token`"
                .into(),
        ));
    }
    if !secrets.contains_key("client_secret") {
        return Err(Rejection::Invalid(
            "field `client_secret` is missing (auth = client_credentials)".into(),
        ));
    }
    if !params.contains_key("client_id") {
        return Err(Rejection::Invalid(
            "parameter `client_id` is missing (auth = client_credentials)".into(),
        ));
    }
    // Client secrets carry no expiry the vault can read.
    Ok(Checked { expires_at: None })
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

    use crate::providers::validation::answer;

    #[test]
    fn a_token_answer_is_read_defensively() {
        let ok = read_minted(&answer(
            200,
            r#"{"access_token":"t0k","expires_in":3600,"token_type":"Bearer"}"#,
        ))
        .unwrap();
        assert_eq!(ok.token.expose_secret(), "t0k");
        assert_eq!(ok.lifetime, Duration::from_secs(3600));
        // Lifetimes are bounded; a missing one is an hour.
        let lifetime = |body: &str| read_minted(&answer(200, body)).unwrap().lifetime;
        assert_eq!(
            lifetime(r#"{"access_token":"t","expires_in":1}"#).as_secs(),
            60
        );
        assert_eq!(
            lifetime(r#"{"access_token":"t","expires_in":99999999}"#).as_secs(),
            86400
        );
        assert_eq!(lifetime(r#"{"access_token":"t"}"#).as_secs(), 3600);
        for (status, body, verdict) in [
            (
                200,
                r#"{"token_type":"Bearer"}"#,
                Verdict::UnexpectedResponse,
            ),
            (200, r#"{"access_token":""}"#, Verdict::UnexpectedResponse),
            (
                200,
                r#"{"access_token":"t","token_type":"MAC"}"#,
                Verdict::UnexpectedResponse,
            ),
            (200, "not json", Verdict::UnexpectedResponse),
            (401, r#"{"error":"invalid_client"}"#, Verdict::Rejected),
            (400, r#"{"error":"invalid_grant"}"#, Verdict::Rejected),
            (403, "{}", Verdict::InsufficientPermission),
            (429, "{}", Verdict::RateLimited),
            (503, "{}", Verdict::Unreachable),
            (302, "", Verdict::UnexpectedResponse),
        ] {
            let Err(v) = read_minted(&answer(status, body)) else {
                panic!("{status} {body} minted a token");
            };
            assert_eq!(v.verdict, verdict, "{status} {body}: {v:?}");
        }
        let refused = read_minted(&answer(401, r#"{"error":"invalid_client"}"#)).unwrap_err();
        assert!(refused.message.contains("invalid_client"), "{refused:?}");
    }

    #[test]
    fn each_shape_needs_its_own_fields() {
        let secrets = |pairs: &[(&str, &str)]| -> Secrets {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).into()))
                .collect()
        };
        let params = |pairs: &[(&str, &str)]| -> Params {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let cc = params(&[
            ("tenant_id", "acme"),
            ("auth", "client_credentials"),
            ("client_id", "id"),
        ]);
        assert!(check(&secrets(&[("client_secret", "s")]), &cc).is_ok());
        assert!(check(&secrets(&[]), &cc).is_err());
        let token = jwt(r#"{"sub":"x"}"#);
        assert!(check(
            &secrets(&[("client_secret", "s"), ("access_token", &token)]),
            &cc
        )
        .is_err());
        let mut no_id = cc.clone();
        no_id.remove("client_id");
        assert!(check(&secrets(&[("client_secret", "s")]), &no_id).is_err());
        let token_shape = params(&[("tenant_id", "acme"), ("auth", "token")]);
        assert!(check(&secrets(&[("access_token", &token)]), &token_shape).is_ok());
        assert!(check(&secrets(&[("client_secret", "s")]), &token_shape).is_err());
        assert!(check(&secrets(&[]), &token_shape).is_err());
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
