//! Amplitude: an API key and secret key pair from one project, in the US or EU region.

use base64::Engine;
use secrecy::ExposeSecret;
use zeroize::Zeroizing;

use super::validation::{classify, Answer, ProbeHeader, Reading, Validation};
use super::{
    Checked, FieldSpec, MonitorBudget, Params, ProviderSpec, QuotaUnit, Rejection, Route, Secrets,
    ValidationSpec,
};

pub static SPEC: ProviderSpec = ProviderSpec {
    name: "amplitude",
    display_name: "Amplitude",
    secrets: &[
        FieldSpec::required("api_key", "the project's API key", 256),
        FieldSpec::required("secret_key", "the project's secret key", 256),
    ],
    params: &[
        FieldSpec::choice("region", "the project's data center", &["us", "eu"], "us"),
        FieldSpec::choice(
            "validation",
            "the validation call: events (/api/2/events/list) or taxonomy (needs Enterprise or Govern)",
            &["events", "taxonomy"],
            "events",
        ),
    ],
    check,
    auth,
    validation: ValidationSpec {
        base_urls: &[
            ("us", "https://amplitude.com"),
            ("eu", "https://analytics.eu.amplitude.com"),
        ],
        base_url_param: "region",
        // Amplitude answers a bad key and a wrong region alike, with 401 or 403.
        wrong_region_on: &[401, 403],
        // At most 5 concurrent REST requests per project; leave one for the product.
        max_concurrent: 4,
        path,
        interpret,
        permissions: None,
    },
    routes: &[
        Route::get("/api/2/events/list"),
        Route::get("/api/2/annotations"),
        Route::post("/api/2/annotations"),
        Route::get("/api/3/annotations"),
        Route::post("/api/3/annotations"),
        Route::get("/api/3/annotation-categories"),
        Route::post("/api/3/annotation-categories"),
        Route::get("/api/3/cohorts"),
        Route::get("/api/2/taxonomy/*"),
        Route::get("/api/2/events/segmentation"),
    ],
    mint: None,
    monitor: MonitorBudget {
        quota: "5 concurrent REST requests per project",
        unit: QuotaUnit::Secret("api_key"),
        concurrent: 1,
        rate: None,
    },
};

fn uses_taxonomy(params: &Params) -> bool {
    params.get("validation").is_some_and(|v| v == "taxonomy")
}

/// Basic auth with the key pair, on every REST call.
fn auth(secrets: &Secrets, _params: &Params) -> Vec<ProbeHeader> {
    let secret = |name: &str| {
        secrets
            .get(name)
            .map(|s| s.expose_secret())
            .unwrap_or_default()
    };
    let mut pair = Zeroizing::new(String::new());
    pair.push_str(secret("api_key"));
    pair.push(':');
    pair.push_str(secret("secret_key"));
    let encoded = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(pair.as_bytes()));
    vec![ProbeHeader {
        name: "authorization",
        value: Zeroizing::new(format!("Basic {}", encoded.as_str())),
        sensitive: true,
    }]
}

fn path(params: &Params) -> String {
    if uses_taxonomy(params) {
        "/api/2/taxonomy/category".to_owned()
    } else {
        "/api/2/events/list".to_owned()
    }
}

fn interpret(answer: &Answer, params: &Params) -> Validation {
    let reading = Reading {
        // A bad key or secret may come back as 403 too.
        forbidden_is_permission: false,
        not_found_is_permission: false,
    };
    let taxonomy = uses_taxonomy(params);
    // No Basic-auth endpoint returns the project's name.
    classify(answer, &reading, "Amplitude", |json| {
        let data_is_list = json.get("data").is_some_and(serde_json::Value::is_array);
        let success = !taxonomy || json.get("success") == Some(&serde_json::Value::Bool(true));
        (data_is_list && success).then(String::new)
    })
}

fn check(_secrets: &Secrets, _params: &Params) -> Result<Checked, Rejection> {
    Ok(Checked::default())
}
