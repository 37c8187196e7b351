//! A root key given in an environment variable is removed from the process
//! environment once read. Its own test binary: setting a variable is only
//! safe while no other thread reads the environment.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)] // one thread; fails loudly

use credvault::crypto::{RootKey, RootKeyError};

#[test]
fn a_root_key_from_the_environment_is_removed_from_it() {
    let name = "CREDVAULT_TEST_ROOT_KEY";
    std::env::set_var(name, "ab".repeat(32));
    assert!(RootKey::from_env(name).is_ok());
    assert!(
        std::env::var_os(name).is_none(),
        "the root key is still in the environment"
    );
    assert!(matches!(
        RootKey::from_env(name),
        Err(RootKeyError::MissingEnv)
    ));
}
