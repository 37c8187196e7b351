//! Provider answers: any status and body maps to a verdict without panicking.
#![no_main]

use credvault::providers::validation::Answer;
use credvault::providers::{Params, Provider};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let status = 100 + u16::from_be_bytes([data[0], data[1]]) % 500;
    let answer = Answer {
        status,
        retry_after: Some(u64::from(data[2])),
        body: data[3..].to_vec(),
        truncated: data[2] & 1 == 1,
    };
    let params: Params = [
        ("tenant_id".to_owned(), "acme".to_owned()),
        ("validation".to_owned(), "taxonomy".to_owned()),
    ]
    .into();
    for provider in Provider::ALL {
        let v = (provider.spec().validation.interpret)(&answer, &params);
        assert_eq!(v.provider_status, status);
    }
});
