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

/// The file's permission bits if group or others may access it: key
/// material must be readable by its owner only.
pub fn shared_mode(path: &std::path::Path) -> std::io::Result<Option<u32>> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)?.permissions().mode();
    Ok((mode & 0o077 != 0).then_some(mode & 0o777))
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
