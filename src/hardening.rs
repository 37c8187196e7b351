//! Process hardening: no core dumps, so decrypted secrets never reach a crash file; key and
//! trust files read only when nobody else could have changed them.

use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use zeroize::Zeroizing;

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

/// Why a file of key material or of trust was refused. Names the file and
/// what to do, never its contents.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    #[error("{what} {path} could not be read: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "{what} {path} is a symbolic link; name the file itself (key files are opened without \
         following links, so that the file checked is the file read)"
    )]
    Symlink { what: &'static str, path: PathBuf },
    #[error("{what} {path} is not a regular file (a directory, a FIFO, a device); name a file")]
    NotAFile { what: &'static str, path: PathBuf },
    /// A file of key material that is not there, under a name that looks
    /// like a secret: its path is not repeated, in case the secret itself was
    /// written where the path belongs.
    #[error(
        "the {what} named in the configuration does not exist (its path is not repeated \
         here, in case a secret was written in its place)"
    )]
    SecretFileMissing { what: &'static str },
    #[error(
        "{what} {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    Shared {
        what: &'static str,
        path: PathBuf,
        mode: u32,
    },
    #[error(
        "{what} {path} is writable by group or others (mode {mode:o}), and the vault trusts \
         what it holds; run `chmod go-w {path}`"
    )]
    Writable {
        what: &'static str,
        path: PathBuf,
        mode: u32,
    },
    #[error(
        "{what} {path} belongs to user {owner}, not to the user the vault runs as ({uid}) or \
         root, who could change it; run `chown {uid} {path}`"
    )]
    Owner {
        what: &'static str,
        path: PathBuf,
        owner: u32,
        uid: u32,
    },
}

/// Reads a file of key material in one open, without following a symbolic
/// link, and checks the open file itself (fstat): owned by this user or
/// root, readable by its owner only. What is checked is what is read, so the
/// file cannot be swapped between the check and the read.
pub fn read_private(what: &'static str, path: &Path) -> Result<Zeroizing<Vec<u8>>, FileError> {
    let io = io_error(what, path);
    let mut file = open_file(what, path, false).map_err(|e| match e {
        FileError::Io { source, .. }
            if source.kind() == io::ErrorKind::NotFound && looks_like_a_secret(path) =>
        {
            FileError::SecretFileMissing { what }
        }
        other => other,
    })?;
    let meta = file.metadata().map_err(io)?;
    check_owner(what, path, &meta)?;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(FileError::Shared {
            what,
            path: path.to_owned(),
            mode,
        });
    }
    let mut bytes = Zeroizing::new(Vec::new());
    file.read_to_end(&mut bytes).map_err(io)?;
    Ok(bytes)
}

/// Reads a file the vault trusts and reloads while serving (a CA bundle, a
/// CRL, the configuration): refused if group or others may write it, or if
/// a user other than this one or root owns it, checked on the open file.
pub fn read_trusted(what: &'static str, path: &Path) -> Result<Vec<u8>, FileError> {
    let io = io_error(what, path);
    let mut file = open_file(what, path, true)?;
    let meta = file.metadata().map_err(io)?;
    check_unchangeable(what, path, &meta)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(io)?;
    Ok(bytes)
}

/// Opens a public file to read it (an anchor file, an export, a public
/// key): without blocking, and only if it is a regular file, so that a FIFO
/// put in its place is refused rather than waited on.
pub fn open_public(what: &'static str, path: &Path) -> Result<std::fs::File, FileError> {
    open_file(what, path, true)
}

/// Opens a file the vault trusts without reading it (a library it loads),
/// and checks the file opened, not the path: refused if group or others may
/// write it, or if a user other than this one or root owns it. Use the
/// returned file (e.g. through `/proc/self/fd`), never the path again.
pub fn open_trusted(what: &'static str, path: &Path) -> Result<std::fs::File, FileError> {
    let file = open_file(what, path, true)?;
    let meta = file.metadata().map_err(io_error(what, path))?;
    check_unchangeable(what, path, &meta)?;
    Ok(file)
}

/// Owned by root or this user, and writable by neither group nor others.
fn check_unchangeable(
    what: &'static str,
    path: &Path,
    meta: &std::fs::Metadata,
) -> Result<(), FileError> {
    check_owner(what, path, meta)?;
    let mode = meta.mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(FileError::Writable {
            what,
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Names the file and what it is for in an I/O error.
fn io_error<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl Fn(std::io::Error) -> FileError + Copy + 'a {
    move |source| FileError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Writes a public file (mode 0644, whatever mode an old file had), never
/// through a symbolic link: a link planted at `path` could otherwise make
/// the vault overwrite any file it may write.
pub fn write_public(what: &'static str, path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    let io = io_error(what, path);
    let mut file = open_no_follow(
        what,
        path,
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644),
        non_blocking(),
    )?;
    regular(what, path, &file)?;
    file.set_len(0).map_err(io_error(what, path))?;
    // `mode` applies only to a new file; an old one keeps its own otherwise.
    file.set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(io)?;
    file.write_all(bytes).map_err(io)
}

/// Appends `line` and a newline to `path` (created 0644, never through a
/// symlink) and waits until it is on disk: for records that must outlive
/// the database, such as the audit anchor file.
pub fn append_public(what: &'static str, path: &Path, line: &str) -> Result<(), FileError> {
    let io = io_error(what, path);
    let mut file = open_no_follow(
        what,
        path,
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o644),
        non_blocking(),
    )?;
    regular(what, path, &file)?;
    file.write_all(format!("{line}\n").as_bytes()).map_err(io)?;
    file.sync_data().map_err(io)
}

/// The PEM certificates in a trusted file (see [`read_trusted`]); at least one.
pub fn read_trusted_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read_trusted(what, path).map_err(|e| e.to_string())?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {} holds no PEM certificate",
            path.display()
        ));
    }
    Ok(certs)
}

/// Whether a path looks like a secret written where a path belongs (a PIN,
/// a hex or base64 key) rather than a file's: its folder is not there, or
/// its name has no dot and is all digits, or 20 or more characters of a
/// key's alphabet.
fn looks_like_a_secret(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let key_alphabet = |c: char| c.is_ascii_alphanumeric() || "+/=_-".contains(c);
    // A base64 key holding `/` reads as folders that are not there.
    let folder_missing = path.parent().is_some_and(|p| !p.is_dir());
    folder_missing
        || (!name.contains('.')
            && (name.chars().all(|c| c.is_ascii_digit())
                || (name.len() >= 20 && name.chars().all(key_alphabet))))
}

/// Opens the regular file at `path` for reading (through a symbolic link
/// only with `follow`), without blocking: a FIFO or a device named in the
/// configuration is refused, never waited on.
fn open_file(what: &'static str, path: &Path, follow: bool) -> Result<std::fs::File, FileError> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    let file = if follow {
        options
            .custom_flags(non_blocking())
            .open(path)
            .map_err(io_error(what, path))?
    } else {
        open_no_follow(what, path, &mut options, non_blocking())?
    };
    regular(what, path, &file)?;
    Ok(file)
}

/// `O_NONBLOCK`: opening a FIFO or a device does not wait.
fn non_blocking() -> i32 {
    // A small positive flag on every Unix: the cast keeps it.
    #[allow(clippy::cast_possible_wrap)]
    let flag = rustix::fs::OFlags::NONBLOCK.bits() as i32;
    flag
}

/// Refuses an open file that is not a regular file (a FIFO, a device, a
/// directory).
fn regular(what: &'static str, path: &Path, file: &std::fs::File) -> Result<(), FileError> {
    let meta = file.metadata().map_err(io_error(what, path))?;
    if meta.is_file() {
        Ok(())
    } else {
        Err(FileError::NotAFile {
            what,
            path: path.to_owned(),
        })
    }
}

/// Opens `path` as `options` say, failing if its last component is a symbolic link.
fn open_no_follow(
    what: &'static str,
    path: &Path,
    options: &mut std::fs::OpenOptions,
    flags: i32,
) -> Result<std::fs::File, FileError> {
    // O_NOFOLLOW is a small positive flag on every Unix: the cast keeps it.
    #[allow(clippy::cast_possible_wrap)]
    let no_follow = rustix::fs::OFlags::NOFOLLOW.bits() as i32;
    options
        .custom_flags(no_follow | flags)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
                FileError::Symlink {
                    what,
                    path: path.to_owned(),
                }
            } else if e.raw_os_error() == Some(rustix::io::Errno::NXIO.raw_os_error()) {
                // Opened to write without blocking: a FIFO with no reader.
                FileError::NotAFile {
                    what,
                    path: path.to_owned(),
                }
            } else {
                io_error(what, path)(e)
            }
        })
}

fn check_owner(what: &'static str, path: &Path, meta: &std::fs::Metadata) -> Result<(), FileError> {
    let uid = rustix::process::geteuid().as_raw();
    let owner = meta.uid();
    if owner != uid && owner != 0 {
        return Err(FileError::Owner {
            what,
            path: path.to_owned(),
            owner,
            uid,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// A key or PIN written where a key file's path belongs is not repeated
    /// when the file is missing (review round 3); a real file name is.
    #[test]
    fn a_missing_key_file_is_named_unless_its_name_looks_like_a_secret() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        for (name, shown) in [
            ("root.key", true),
            ("hsm-pin", true),
            ("738215", false),
            (&"ab".repeat(32)[..], false),
            ("Kq3/9xZtWm1Yp+Lr2Vb7Nc5Hd8Fg0Js4Ae6Ti/Uo=", false),
        ] {
            let err = super::read_private("root key file", &dir.path().join(name))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            let last = name.rsplit('/').next().unwrap_or(name);
            assert_eq!(err.contains(last), shown, "{name}: {err}");
            assert!(!err.is_empty());
        }
    }

    #[test]
    fn core_limit_is_zero_afterwards() {
        super::disable_core_dumps();
        let limit = rustix::process::getrlimit(rustix::process::Resource::Core);
        assert_eq!(limit.current, Some(0));
    }
}
