//! Process hardening: no core dumps, so decrypted secrets never reach a crash file.

/// Marks the process non-dumpable (also blocks ptrace by other users) and sets
/// the core-file limit to zero. Failures are logged, not fatal: the vault still
/// works, only without this defence.
pub fn disable_core_dumps() {
    if let Err(e) =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
    {
        tracing::warn!(error = %e, "could not mark the process non-dumpable");
    }
    let none = rustix::process::Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    if let Err(e) = rustix::process::setrlimit(rustix::process::Resource::Core, none) {
        tracing::warn!(error = %e, "could not disable core dumps");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn core_limit_is_zero_afterwards() {
        super::disable_core_dumps();
        let limit = rustix::process::getrlimit(rustix::process::Resource::Core);
        assert_eq!(limit.current, Some(0));
    }
}
