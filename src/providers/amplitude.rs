//! Amplitude: an API key and secret key pair from one project, in the US or EU region.

use super::{Checked, FieldSpec, Params, ProviderSpec, Rejection, Secrets};

pub static SPEC: ProviderSpec = ProviderSpec {
    name: "amplitude",
    display_name: "Amplitude",
    secrets: &[
        FieldSpec::secret("api_key", "the project's API key", 256),
        FieldSpec::secret("secret_key", "the project's secret key", 256),
    ],
    params: &[FieldSpec::choice(
        "region",
        "the project's data center",
        &["us", "eu"],
        "us",
    )],
    check,
};

fn check(_secrets: &Secrets, _params: &Params) -> Result<Checked, Rejection> {
    Ok(Checked::default())
}
