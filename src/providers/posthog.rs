//! PostHog: a personal API key (`phx_…`) for one project in the US or EU cloud.

use std::time::Duration;

use secrecy::ExposeSecret;

use zeroize::Zeroizing;

use super::validation::{classify, printable, Answer, ProbeHeader, Reading, Validation, Verdict};
use super::{
    Checked, FieldSpec, MonitorBudget, Params, Permissions, ProviderSpec, QuotaUnit, Rate,
    Rejection, Route, Secrets, ValidationSpec,
};

pub static SPEC: ProviderSpec = ProviderSpec {
    name: "posthog",
    display_name: "PostHog",
    secrets: &[FieldSpec::required(
        "personal_api_key",
        "a personal API key (starts with phx_) with project:read scope",
        256,
    )],
    params: &[
        FieldSpec::required("project_id", "the numeric project id", 20),
        FieldSpec::choice("region", "the PostHog cloud", &["us", "eu"], "us"),
    ],
    check,
    auth,
    validation: ValidationSpec {
        base_urls: &[
            ("us", "https://us.posthog.com"),
            ("eu", "https://eu.posthog.com"),
        ],
        base_url_param: "region",
        // A key sent to the other region's host gets the same 401 as a bad key.
        wrong_region_on: &[401],
        max_concurrent: 8,
        path,
        interpret,
        permissions: Some(Permissions {
            path: |_| "/api/personal_api_keys/@current/".to_owned(),
            judge,
        }),
    },
    // `{project_id}` must be the connection's own project.
    routes: &[
        Route::get("/api/projects/{project_id}/annotations/"),
        Route::post("/api/projects/{project_id}/annotations/"),
        Route::get("/api/projects/{project_id}/cohorts/"),
        Route::post("/api/projects/{project_id}/query/"),
    ],
    mint: None,
    monitor: MonitorBudget {
        quota: "240 analytics requests per minute per team",
        unit: QuotaUnit::Param("project_id"),
        concurrent: 1,
        // A tenth: 24 a minute.
        rate: Some(Rate {
            requests: 24,
            per: Duration::from_secs(60),
        }),
    },
};

fn auth(secrets: &Secrets, _params: &Params) -> Vec<ProbeHeader> {
    let key = secrets
        .get("personal_api_key")
        .map(|s| s.expose_secret())
        .unwrap_or_default();
    vec![ProbeHeader {
        name: "authorization",
        value: Zeroizing::new(format!("Bearer {key}")),
        sensitive: true,
    }]
}

fn path(params: &Params) -> String {
    let project = params
        .get("project_id")
        .map(String::as_str)
        .unwrap_or_default();
    format!("/api/projects/{project}/")
}

fn interpret(answer: &Answer, _params: &Params) -> Validation {
    let reading = Reading {
        // 403: the key lacks the project:read scope.
        forbidden_is_permission: true,
        // 404: the key reaches no such project.
        not_found_is_permission: true,
    };
    classify(answer, &reading, "PostHog", |json| {
        json.get("name")
            .and_then(serde_json::Value::as_str)
            .map(printable)
    })
}

/// The scope a call needs: validation reads the project; each allowlisted
/// route reads or writes one kind of object.
fn scope(route: &Route) -> Option<&'static str> {
    let object = if route.template.ends_with("/annotations/") {
        "annotation"
    } else if route.template.ends_with("/cohorts/") {
        "cohort"
    } else if route.template.ends_with("/query/") {
        // A HogQL query is a read, whatever its method.
        return Some("query:read");
    } else {
        return None;
    };
    Some(match (object, route.method) {
        ("annotation", "GET") => "annotation:read",
        ("annotation", _) => "annotation:write",
        ("cohort", "GET") => "cohort:read",
        _ => "cohort:write",
    })
}

/// `GET /api/personal_api_keys/@current/`: the key's `scopes` (`*` for all;
/// a `:write` scope includes its `:read`) and `scoped_teams` (empty for all
/// projects). A 403 here means the key may not read itself: the first
/// verdict stands, as it does for any answer that cannot tell.
fn judge(answer: &Answer, params: &Params, routes: &[&'static Route]) -> Option<Validation> {
    if answer.status != 200 || answer.truncated {
        return None;
    }
    let json = answer.json()?;
    let scopes: Vec<&str> = json
        .get("scopes")?
        .as_array()?
        .iter()
        .filter_map(serde_json::Value::as_str)
        .collect();
    let teams: Vec<u64> = json
        .get("scoped_teams")
        .and_then(serde_json::Value::as_array)
        .map(|t| t.iter().filter_map(serde_json::Value::as_u64).collect())
        .unwrap_or_default();
    let project = params.get("project_id").map_or("", String::as_str);
    if !teams.is_empty() && !teams.iter().any(|t| t.to_string() == project) {
        return Some(Validation::answered(
            Verdict::InsufficientPermission,
            answer.status,
            format!(
                "PostHog: the key is scoped to other projects than {project}; allow this \
                 project in the key's settings, or store a key for it"
            ),
        ));
    }
    let has = |needed: &str| {
        scopes.iter().any(|s| {
            *s == "*"
                || *s == needed
                || needed
                    .strip_suffix(":read")
                    .is_some_and(|object| *s == format!("{object}:write"))
        })
    };
    let mut missing: Vec<String> = std::iter::once("project:read")
        .chain(routes.iter().filter_map(|r| scope(r)))
        .filter(|needed| !has(needed))
        .map(str::to_owned)
        .collect();
    missing.sort();
    missing.dedup();
    // Granting `x:write` grants `x:read` too: name only the write.
    let writes: Vec<String> = missing
        .iter()
        .filter_map(|m| m.strip_suffix(":write").map(str::to_owned))
        .collect();
    missing.retain(|m| {
        m.strip_suffix(":read")
            .is_none_or(|object| !writes.iter().any(|w| w == object))
    });
    if missing.is_empty() {
        return None;
    }
    Some(Validation {
        missing_scopes: missing.clone(),
        ..Validation::answered(
            Verdict::InsufficientPermission,
            answer.status,
            format!(
                "PostHog: the key lacks scopes for calls this vault makes with it: {}; add them \
                 to the key, or narrow providers.posthog.proxy",
                missing.join(", ")
            ),
        )
    })
}

fn check(secrets: &Secrets, params: &Params) -> Result<Checked, Rejection> {
    let key = secrets
        .get("personal_api_key")
        .map(|s| s.expose_secret())
        .unwrap_or_default();
    if key.starts_with("phc_") {
        return Err(Rejection::Invalid(
            "field `personal_api_key` holds a project token (phc_…), which is public and cannot \
             read the API; create a personal API key (phx_…) instead"
                .into(),
        ));
    }
    if !key.starts_with("phx_") {
        return Err(Rejection::Invalid(
            "field `personal_api_key` must be a personal API key starting with phx_".into(),
        ));
    }
    let project = params
        .get("project_id")
        .map(String::as_str)
        .unwrap_or_default();
    if !matches!(project.parse::<u64>(), Ok(n) if n > 0)
        || !project.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(Rejection::Invalid(
            "parameter `project_id` must be a positive integer".into(),
        ));
    }
    Ok(Checked::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(key: &str, project: &str) -> Result<Checked, Rejection> {
        let secrets = Secrets::from([("personal_api_key".to_owned(), key.into())]);
        let params = Params::from([("project_id".to_owned(), project.to_owned())]);
        check(&secrets, &params)
    }

    #[test]
    fn accepts_personal_key_and_numeric_project() {
        assert!(run("phx_abcdefghijklmnopqrstuvwxyz", "12345").is_ok());
    }

    #[test]
    fn rejects_project_token_saying_why_without_echoing_it() {
        let Err(Rejection::Invalid(msg)) = run("phc_canaryCANARY123456", "1") else {
            panic!("expected rejection")
        };
        assert!(msg.contains("project token"));
        assert!(!msg.contains("canary"));
    }

    #[test]
    fn rejects_non_numeric_project() {
        for bad in ["abc", "-1", "0", "+5", "1.5"] {
            assert!(run("phx_abcdefghijklmnop", bad).is_err(), "{bad}");
        }
    }
}
