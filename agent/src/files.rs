//! How the agent touches its own files so that another local user cannot steer it: links are not
//! followed where the agent writes (`O_NOFOLLOW`), temporary files are created new (`O_EXCL`)
//! and never through a stale link, folders are made 0700 whatever the umask, and a
//! configuration file someone else could write is refused with the command that fixes it.
//!
//! The agent is Unix-only for now (as `audit.rs` is): these are Unix permissions.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Why a configuration file was not read.
#[derive(Debug)]
pub enum ReadError {
    /// It could not be read (a missing file is `NotFound`).
    Io(std::io::Error),
    /// It or its folder may be written by another user; the message says how to fix it.
    Unsafe(String),
}

/// Reads a file whose content steers the agent (configuration, origin decisions): refused when
/// it, or the folder holding it, may be written by a user other than this one (or root).
/// A link is followed (dotfile managers use them), and the file it reaches is what is checked.
pub fn read_private_config(path: &Path) -> Result<String, ReadError> {
    let mut file = File::open(path).map_err(ReadError::Io)?;
    let meta = file.metadata().map_err(ReadError::Io)?;
    let shown = path.display();
    if meta.mode() & 0o022 != 0 {
        return Err(ReadError::Unsafe(format!(
            "{shown} may be changed by other users (mode {:04o}), who could then choose the \
             program that asks for your PIN; refused. Fix: chmod go-w {shown}",
            meta.mode() & 0o7777
        )));
    }
    if let Some(me) = current_uid() {
        if meta.uid() != me && meta.uid() != 0 {
            return Err(ReadError::Unsafe(format!(
                "{shown} belongs to user id {}, not to you; refused. Fix: chown $(id -u) {shown} \
                 (or remove it)",
                meta.uid()
            )));
        }
    }
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::metadata(dir) {
            // Sticky folders (/tmp) let others add files but not replace this one.
            if d.mode() & 0o002 != 0 && d.mode() & 0o1000 == 0 {
                return Err(ReadError::Unsafe(format!(
                    "the folder {} may be changed by anyone, who could replace {shown}; \
                     refused. Fix: chmod o-w {}",
                    dir.display(),
                    dir.display()
                )));
            }
        }
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(ReadError::Io)?;
    Ok(text)
}

/// Creates `dir` and any missing parent with mode 0700 (the umask can only take bits away).
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Opens (creating, mode 0600) a file to append to, never through a symbolic link.
pub fn open_append_nofollow(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Opens (creating, mode 0600) a file to read and write in place, never through a symbolic link.
pub fn open_rw_nofollow(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Replaces `path` with `bytes` atomically: a new temporary file beside it (mode 0600, created
/// with `O_EXCL | O_NOFOLLOW` after a stale one — or a link planted there — is removed, which
/// never touches what a link points to), synced, then renamed over `path`.
pub fn write_atomic_private(path: &Path, tmp: &Path, bytes: &[u8]) -> std::io::Result<()> {
    match std::fs::remove_file(tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(tmp, path)?;
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        // The rename is durable once the folder is synced; a failure here loses nothing yet.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// This process's user id (Linux: the owner of `/proc/self`); None where it cannot be told
/// without `unsafe`.
pub fn current_uid() -> Option<u32> {
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_file_others_may_write_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("config.toml");
        std::fs::write(&file, "port = 1").expect("write");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        match read_private_config(&file) {
            Err(ReadError::Unsafe(m)) => assert!(m.contains("chmod go-w"), "{m}"),
            other => panic!("{other:?}"),
        }
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert_eq!(read_private_config(&file).expect("read"), "port = 1");
    }

    #[test]
    fn temporaries_never_write_through_a_link() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("victim");
        std::fs::write(&target, "keep").expect("write");
        let tmp = dir.path().join("o.toml.tmp");
        std::os::unix::fs::symlink(&target, &tmp).expect("symlink");
        write_atomic_private(&dir.path().join("o.toml"), &tmp, b"new").expect("write");
        assert_eq!(std::fs::read_to_string(&target).expect("read"), "keep");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("o.toml")).expect("read"),
            "new"
        );
        let link = dir.path().join("log");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        assert!(open_append_nofollow(&link).is_err());
    }
}
