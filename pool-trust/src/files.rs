//! Key and token material at rest: every secret is a 0600 file inside a 0700 directory,
//! written atomically, and a key file others can read is refused rather than used.
//!
//! A write goes to a new temporary file beside the target (created with the final mode,
//! then set to it exactly, whatever the umask), is fsynced, renamed over the target, and the
//! directory is fsynced: after a crash the file holds the old bytes or the new ones, never
//! a mixture, and never a moment with looser permissions.
//!
//! Only the mode bits are checked; who owns a file is the deployment's business (the
//! daemon's `User=` and its state directory).

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of a directory holding secrets.
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// Mode of a file holding a secret (a private key, a token, a CHAP secret).
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Mode of a file anyone may read (a certificate, the CA bundle).
pub const PUBLIC_FILE_MODE: u32 = 0o644;
/// The largest file this module reads: key and certificate files are a few KiB.
pub const MAX_FILE_LEN: u64 = 1 << 20;

/// Errors reading or writing key material.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// An I/O operation failed.
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A directory meant for secrets that others may enter or read.
    #[error("directory {path} has mode {mode:04o}; a directory holding keys must be 0700")]
    DirectoryTooOpen { path: PathBuf, mode: u32 },
    /// A key file that others may read or write.
    #[error("key file {path} has mode {mode:04o}; it must be 0600")]
    KeyTooOpen { path: PathBuf, mode: u32 },
    /// A path that should be a directory but is not.
    #[error("{path} is not a directory")]
    NotDirectory { path: PathBuf },
    /// A path that should be a regular file but is not.
    #[error("{path} is not a regular file")]
    NotFile { path: PathBuf },
    /// A file larger than anything this crate writes.
    #[error("{path} is {len} bytes, more than the {max} a key file may be")]
    TooLarge { path: PathBuf, len: u64, max: u64 },
    /// A path with no parent directory or no file name.
    #[error("{path} does not name a file in a directory")]
    BadPath { path: PathBuf },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FileError + 'a {
    move |source| FileError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Creates `dir` (and missing parents) with mode 0700, or checks that the existing one
/// is a directory nobody else may enter. An existing looser directory is refused, not
/// tightened: someone set it so, and may rely on it.
pub fn ensure_private_dir(dir: &Path) -> Result<(), FileError> {
    DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)
        .map_err(io_err("create directory", dir))?;
    ensure_existing_private_dir(dir)
}

/// Checks that `dir` exists and is a directory nobody else may enter; creates nothing.
pub fn ensure_existing_private_dir(dir: &Path) -> Result<(), FileError> {
    let meta = fs::metadata(dir).map_err(io_err("inspect", dir))?;
    if !meta.is_dir() {
        return Err(FileError::NotDirectory {
            path: dir.to_owned(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(FileError::DirectoryTooOpen {
            path: dir.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Writes a secret: `path` becomes a 0600 file, atomically, in a 0700 directory (created
/// if missing).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    let dir = parent(path)?;
    ensure_private_dir(dir)?;
    write_atomic(path, bytes, PRIVATE_FILE_MODE)
}

/// Writes a file anyone may read (a certificate, a CA bundle) as 0644, atomically; its
/// directory is created 0700 if missing, as it usually sits beside the key.
pub fn write_public(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    let dir = parent(path)?;
    if !dir.exists() {
        ensure_private_dir(dir)?;
    }
    write_atomic(path, bytes, PUBLIC_FILE_MODE)
}

/// Writes `bytes` to `path` with exactly `mode`: temporary file, fsync, rename, fsync of
/// the directory. The temporary file is removed if any step fails.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    let dir = parent(path)?;
    let name = path.file_name().ok_or_else(|| FileError::BadPath {
        path: path.to_owned(),
    })?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        crate::hex::encode(&rand::random::<[u8; 8]>())
    ));
    if let Err(e) = write_new(&tmp, bytes, mode) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(io_err("rename into place", path)(e));
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// Creates `tmp` (which must not exist) with exactly `mode`, writes `bytes` and fsyncs.
fn write_new(tmp: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(tmp)
        .map_err(io_err("create", tmp))?;
    // The umask may have narrowed the mode; set exactly what was asked.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err("set the mode of", tmp))?;
    f.write_all(bytes).map_err(io_err("write", tmp))?;
    f.sync_all().map_err(io_err("fsync", tmp))
}

/// Reads a secret, refusing a file whose mode lets anyone but its owner read or write
/// it (the check is on the opened file, so a swap between check and read changes
/// nothing).
pub fn read_private(path: &Path) -> Result<Vec<u8>, FileError> {
    read_checked(path, true)
}

/// Reads a file anyone may read (a certificate, a CA bundle).
pub fn read_public(path: &Path) -> Result<Vec<u8>, FileError> {
    read_checked(path, false)
}

fn read_checked(path: &Path, private: bool) -> Result<Vec<u8>, FileError> {
    let f = File::open(path).map_err(io_err("open", path))?;
    let meta = f.metadata().map_err(io_err("inspect", path))?;
    if !meta.is_file() {
        return Err(FileError::NotFile {
            path: path.to_owned(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if private && mode & 0o077 != 0 {
        return Err(FileError::KeyTooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    if meta.len() > MAX_FILE_LEN {
        return Err(FileError::TooLarge {
            path: path.to_owned(),
            len: meta.len(),
            max: MAX_FILE_LEN,
        });
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    f.take(MAX_FILE_LEN + 1)
        .read_to_end(&mut buf)
        .map_err(io_err("read", path))?;
    if buf.len() as u64 > MAX_FILE_LEN {
        return Err(FileError::TooLarge {
            path: path.to_owned(),
            len: buf.len() as u64,
            max: MAX_FILE_LEN,
        });
    }
    Ok(buf)
}

fn parent(path: &Path) -> Result<&Path, FileError> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => Ok(p),
        Some(_) => Ok(Path::new(".")),
        None => Err(FileError::BadPath {
            path: path.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn secrets_are_0600_in_a_0700_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("trust").join("keys");
        let key = dir.join("key.pem");
        write_private(&key, b"secret one").unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&key), 0o600);
        assert_eq!(read_private(&key).unwrap(), b"secret one");

        // Replacing keeps the mode and leaves no temporary file behind.
        write_private(&key, b"secret two").unwrap();
        assert_eq!(mode(&key), 0o600);
        assert_eq!(read_private(&key).unwrap(), b"secret two");
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("key.pem")]);
    }

    #[test]
    fn public_files_are_0644() {
        let tmp = tempfile::tempdir().unwrap();
        let cert = tmp.path().join("d").join("cert.pem");
        write_public(&cert, b"cert").unwrap();
        assert_eq!(mode(&cert), 0o644);
        assert_eq!(mode(cert.parent().unwrap()), 0o700);
        assert_eq!(read_public(&cert).unwrap(), b"cert");
    }

    #[test]
    fn a_key_others_can_read_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let key = tmp.path().join("k").join("key.pem");
        write_private(&key, b"secret").unwrap();
        for loose in [0o644, 0o640, 0o604, 0o660, 0o602] {
            fs::set_permissions(&key, fs::Permissions::from_mode(loose)).unwrap();
            match read_private(&key) {
                Err(FileError::KeyTooOpen { mode, .. }) => assert_eq!(mode, loose),
                other => panic!("mode {loose:o}: {other:?}"),
            }
        }
        fs::set_permissions(&key, fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(read_private(&key).unwrap(), b"secret");
    }

    #[test]
    fn an_open_directory_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("open");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(matches!(
            write_private(&dir.join("key.pem"), b"x"),
            Err(FileError::DirectoryTooOpen { mode: 0o755, .. })
        ));
        assert!(!dir.join("key.pem").exists());
    }

    #[test]
    fn directories_and_missing_files_are_typed_errors() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(matches!(
            read_private(&tmp.path().join("missing")),
            Err(FileError::Io { .. })
        ));
        let file = tmp.path().join("f");
        fs::write(&file, b"x").unwrap();
        assert!(matches!(
            ensure_private_dir(&file),
            Err(FileError::Io { .. } | FileError::NotDirectory { .. })
        ));
    }
}
