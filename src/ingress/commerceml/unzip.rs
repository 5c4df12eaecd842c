//! The zip archives of a session (zip=yes: 1C uploads one archive, then imports the files
//! inside it by name): each is unpacked into the session's files, names made safe, the
//! session's size limit counting what comes out, then removed.

use super::session::{safe_name, Session};
use std::io::Read;
use std::path::{Path, PathBuf};

/// A zip file starts with a local file header.
const MAGIC: &[u8; 4] = b"PK\x03\x04";

/// (English, Russian) of what went wrong.
type Failed = (String, String);

/// Unpacks every archive among the session's top-level files.
pub fn extract_all(session: &Session, limit: u64) -> Result<(), Failed> {
    for archive in archives(&session.files()) {
        extract(session, &archive, limit)?;
        let _ = std::fs::remove_file(&archive);
    }
    Ok(())
}

fn archives(files: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(files) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && starts_with_magic(p))
        .collect()
}

fn starts_with_magic(path: &Path) -> bool {
    let mut head = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && &head == MAGIC
}

fn extract(session: &Session, archive: &Path, limit: u64) -> Result<(), Failed> {
    let shown = archive
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .to_string();
    let broken = |e: &dyn std::fmt::Display| {
        (
            format!("archive {shown:?} can't be read: {e}"),
            format!("архив «{shown}» не читается ({e}): выгрузите его ещё раз"),
        )
    };
    let file = std::fs::File::open(archive).map_err(|e| broken(&e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| broken(&e))?;
    let mut usage = session.usage();
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| broken(&e))?;
        if entry.is_dir() {
            continue;
        }
        let name = entry.name().map_err(|e| broken(&e))?.to_string();
        let relative = safe_name(&name).map_err(|bad| (bad.english(&name), bad.russian(&name)))?;
        let target = session.files().join(relative);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| broken(&e))?;
        }
        let mut out = std::fs::File::create(&target).map_err(|e| broken(&e))?;
        let room = limit.saturating_sub(usage);
        let written =
            std::io::copy(&mut (&mut entry).take(room + 1), &mut out).map_err(|e| broken(&e))?;
        if written > room {
            drop(out);
            let _ = std::fs::remove_file(&target);
            return Err(too_big(&shown, limit));
        }
        usage += written;
    }
    session.set_usage(usage).map_err(|e| broken(&e))
}

/// The session's size limit reached.
pub fn too_big(file: &str, limit: u64) -> Failed {
    (
        format!("{file:?}: the session holds more than its limit of {limit} bytes (session_limit)"),
        format!(
            "«{file}»: сеанс обмена превысил предел {limit} байт (session_limit в настройках lxbridge); \
             уменьшите выгрузку или увеличьте предел"
        ),
    )
}
