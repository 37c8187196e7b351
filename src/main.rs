//! The `credvault` binary: parses the command line and hands over to the library.

/// Freed memory is zeroed, so request buffers the vault does not own (HTTP/2
/// frames, decoded protobuf, TLS records) do not keep plaintext after use.
#[global_allocator]
static ALLOCATOR: zeroizing_alloc::ZeroAlloc<std::alloc::System> =
    zeroizing_alloc::ZeroAlloc(std::alloc::System);

fn main() -> std::process::ExitCode {
    credvault::cli::main()
}
