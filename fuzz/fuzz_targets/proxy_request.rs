//! Proxy requests as a caller writes them: parsing never panics, a request
//! that parses has an origin-form path, and the route the gate names for the
//! policy (`route_name`) is the route the handler matches (`ProxyCall::route`).
#![no_main]

use std::collections::HashMap;

use credvault::domain::proxy::{route_name, ProxyCall};
use credvault::providers::Provider;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(4, '\n');
    let method = parts.next().unwrap_or_default();
    let path = parts.next().unwrap_or_default();
    let header = parts.next().unwrap_or_default();
    let body = parts.next().unwrap_or_default().as_bytes().to_vec();
    let headers: HashMap<String, String> = header
        .split_once(':')
        .map(|(name, value)| [(name.to_owned(), value.to_owned())].into())
        .unwrap_or_default();
    for provider in Provider::ALL {
        let named = route_name(provider.name(), method, path);
        if let Ok(call) = ProxyCall::parse(
            "ws",
            provider.name(),
            method,
            path,
            headers.clone(),
            body.clone(),
        ) {
            assert!(call.path().starts_with('/'));
            assert_eq!(named, call.route().map(|(route, _)| route.to_string()));
        }
    }
});
