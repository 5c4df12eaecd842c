//! An exchange session of 1C's site exchange: made by `checkauth`, named by a cookie any
//! instance can check (an HMAC of the session id under the node's token), its files in a
//! folder of its own, `<dir>/<node>/<session>/`, that the instances behind one address
//! share (or the balancer keeps a session on one instance):
//! - `files/…`: what 1C uploaded, under the names it gave (sub-folders kept, made safe);
//! - `usage`: the bytes uploaded so far (the session's size limit);
//! - `jobs/<file>.json`: the state of each file's import ([`super::import`]);
//! - `sale`: the inbox message number the last `mode=query` served.
//!
//! The node's `current` file names its latest session, for a 1C that sends Basic
//! credentials and no cookie. Sessions idle for [`SESSION_IDLE`] (or `keep_files`, if
//! longer) are removed by [`sweep`].

use ring::hmac;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The cookie lxbridge's checkauth gives.
pub const COOKIE: &str = "LXBRIDGE_CML";

/// A session unused this long is removed (with its files).
pub const SESSION_IDLE: Duration = Duration::from_secs(3600);

/// One exchange session of one node.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: String,
    /// `<dir>/<node>/<id>`.
    pub root: PathBuf,
}

fn mac(token: &str, node: &str, id: &str) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, token.as_bytes());
    let tag = hmac::sign(&key, format!("{node}|{id}").as_bytes());
    hex(&tag.as_ref()[..16])
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new session id: 16 random bytes, hex.
fn new_id() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system's random source works");
    hex(&bytes)
}

impl Session {
    /// Starts a session (checkauth): its folder, and the node's `current` pointing at it.
    pub fn start(node_dir: &Path) -> std::io::Result<Session> {
        let id = new_id();
        let session = Session::at(node_dir, &id);
        std::fs::create_dir_all(session.root.join("files"))?;
        std::fs::write(session.root.join("usage"), "0")?;
        write_atomically(&node_dir.join("current"), id.as_bytes())?;
        Ok(session)
    }

    fn at(node_dir: &Path, id: &str) -> Session {
        Session {
            id: id.to_string(),
            root: node_dir.join(id),
        }
    }

    /// The cookie value: `<id>.<mac>`.
    pub fn cookie(&self, token: &str, node: &str) -> String {
        format!("{}.{}", self.id, mac(token, node, &self.id))
    }

    /// The `sessid` checkauth announces (1C may send it back; the cookie is what counts).
    pub fn sessid(&self, token: &str, node: &str) -> String {
        mac(token, node, &format!("sessid|{}", self.id))
    }

    /// The session a cookie value names, if its mac is right.
    pub fn from_cookie(node_dir: &Path, token: &str, node: &str, value: &str) -> Option<Session> {
        let (id, given) = value.split_once('.')?;
        let valid = id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit());
        (valid && crate::http::same_secret(given.as_bytes(), mac(token, node, id).as_bytes()))
            .then(|| Session::at(node_dir, id))
    }

    /// The node's latest session (for Basic credentials without the cookie).
    pub fn current(node_dir: &Path) -> Option<Session> {
        let id = std::fs::read_to_string(node_dir.join("current")).ok()?;
        let id = id.trim();
        (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| Session::at(node_dir, id))
    }

    /// Still there (not swept, not lost).
    pub fn exists(&self) -> bool {
        self.root.join("usage").exists()
    }

    /// `mode=init`: a new exchange in this session, its earlier files and imports gone.
    pub fn reset(&self) -> std::io::Result<()> {
        for sub in ["files", "jobs"] {
            match std::fs::remove_dir_all(self.root.join(sub)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        let _ = std::fs::remove_file(self.root.join("sale"));
        std::fs::create_dir_all(self.root.join("files"))?;
        std::fs::write(self.root.join("usage"), "0")
    }

    pub fn files(&self) -> PathBuf {
        self.root.join("files")
    }

    pub fn jobs(&self) -> PathBuf {
        self.root.join("jobs")
    }

    /// Bytes uploaded so far.
    pub fn usage(&self) -> u64 {
        std::fs::read_to_string(self.root.join("usage"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn set_usage(&self, bytes: u64) -> std::io::Result<()> {
        write_atomically(&self.root.join("usage"), bytes.to_string().as_bytes())
    }

    /// Remembers the inbox message `mode=query` served.
    pub fn set_served(&self, message_no: i64) -> std::io::Result<()> {
        write_atomically(&self.root.join("sale"), message_no.to_string().as_bytes())
    }

    pub fn served(&self) -> Option<i64> {
        std::fs::read_to_string(self.root.join("sale"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Marks the session used now (what [`sweep`] goes by).
    pub fn touch(&self) {
        let _ = std::fs::File::options()
            .append(true)
            .open(self.root.join("usage"))
            .and_then(|f| f.set_modified(SystemTime::now()));
    }
}

/// Writes through a temporary file and a rename, so a reader sees the old or the new.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Why a file name 1C gave can't be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadName {
    Empty,
    Parent,
    Absolute,
}

impl BadName {
    pub fn russian(&self, name: &str) -> String {
        match self {
            BadName::Empty => "не указано имя файла (параметр filename)".into(),
            BadName::Parent => format!("имя файла «{name}» содержит «..»: такой путь не принят"),
            BadName::Absolute => {
                format!("имя файла «{name}» — абсолютный путь: такой путь не принят")
            }
        }
    }

    pub fn english(&self, name: &str) -> String {
        match self {
            BadName::Empty => "no file name (the filename parameter)".into(),
            BadName::Parent => format!("file name {name:?} contains \"..\": refused"),
            BadName::Absolute => format!("file name {name:?} is an absolute path: refused"),
        }
    }
}

/// The relative path a name 1C gave stands for: `\` read as `/`, the `/tmp/` and
/// `upload/1c/webdata/` prefixes a 1C server on Linux sends dropped (as 1C-Bitrix does),
/// `.` and empty parts dropped; `..` and absolute paths refused.
pub fn safe_name(name: &str) -> Result<PathBuf, BadName> {
    let name = name.replace('\\', "/");
    let trimmed = ["/tmp/", "upload/1c/webdata/", "/upload/1c/webdata/"]
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))
        .unwrap_or(&name);
    let looks_like_drive = trimmed.len() >= 2 && trimmed.as_bytes()[1] == b':';
    if trimmed.starts_with('/') || looks_like_drive {
        return Err(BadName::Absolute);
    }
    let mut path = PathBuf::new();
    for part in Path::new(trimmed).components() {
        match part {
            Component::Normal(p) if !p.is_empty() => path.push(p),
            Component::CurDir => {}
            Component::ParentDir => return Err(BadName::Parent),
            _ => return Err(BadName::Absolute),
        }
    }
    if path.as_os_str().is_empty() || trimmed.contains('\0') {
        return Err(BadName::Empty);
    }
    Ok(path)
}

/// Removes the sessions of a node's folder unused for `idle`.
pub fn sweep(node_dir: &Path, idle: Duration) {
    let Ok(entries) = std::fs::read_dir(node_dir) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let used = std::fs::metadata(path.join("usage"))
            .and_then(|m| m.modified())
            .or_else(|_| entry.metadata().and_then(|m| m.modified()));
        let old = used.is_ok_and(|t| now.duration_since(t).unwrap_or_default() >= idle);
        if old {
            if let Err(e) = std::fs::remove_dir_all(&path) {
                tracing::warn!(path = %path.display(), error = %e, "could not remove an old CommerceML session");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_keep_their_folders_and_lose_no_safety() {
        assert_eq!(
            safe_name("import.xml").unwrap(),
            PathBuf::from("import.xml")
        );
        assert_eq!(
            safe_name("import_files\\ab\\x.jpg").unwrap(),
            PathBuf::from("import_files/ab/x.jpg")
        );
        assert_eq!(
            safe_name("/tmp/offers.xml").unwrap(),
            PathBuf::from("offers.xml")
        );
        assert_eq!(safe_name("./a//b.xml").unwrap(), PathBuf::from("a/b.xml"));
        assert_eq!(safe_name("../etc/passwd"), Err(BadName::Parent));
        assert_eq!(safe_name("a/../../b"), Err(BadName::Parent));
        assert_eq!(safe_name("/etc/passwd"), Err(BadName::Absolute));
        assert_eq!(safe_name("C:\\x.xml"), Err(BadName::Absolute));
        assert_eq!(safe_name(""), Err(BadName::Empty));
        assert_eq!(safe_name("./"), Err(BadName::Empty));
    }

    #[test]
    fn a_cookie_is_valid_for_its_node_and_token_only() {
        let dir = std::env::temp_dir().join(format!("lxcml-session-{}", std::process::id()));
        let session = Session::start(&dir).unwrap();
        let cookie = session.cookie("secret", "ut");
        let back = Session::from_cookie(&dir, "secret", "ut", &cookie).unwrap();
        assert_eq!(back.id, session.id);
        assert!(Session::from_cookie(&dir, "other", "ut", &cookie).is_none());
        assert!(Session::from_cookie(&dir, "secret", "shop", &cookie).is_none());
        assert!(Session::from_cookie(&dir, "secret", "ut", &cookie.replace('.', "x")).is_none());
        assert_eq!(Session::current(&dir).unwrap().id, session.id);
        assert!(session.exists());
        sweep(&dir, Duration::from_secs(3600));
        assert!(session.exists(), "a fresh session is kept");
        sweep(&dir, Duration::ZERO);
        assert!(!session.exists(), "an idle one is removed");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
