//! The embedded backend's database: one SQLite file (`<data_dir>/lxbridge.sqlite3`) that
//! both halves of the backend share, [`EmbeddedBroker`] (in `broker::sqlite`) and
//! [`EmbeddedStore`] (in `store::sqlite`), for a single machine with no RabbitMQ and no
//! Redis. Selected when the config has neither `[broker]` nor `store.redis_url` (or has
//! `[embedded]`). This file owns [`Db`], the thread that runs every call, and the schema.
//!
//! One thread owns the database connection and runs every call. It takes all the calls
//! waiting for it, runs them in one transaction (each under its own savepoint, so one
//! failing call doesn't undo the others) and commits once: group commit. A call is answered
//! only after its transaction is committed, and commits are synchronous (`journal_mode=WAL`,
//! `synchronous=FULL`: the WAL is fsynced at each commit), so a change answered `202` is on
//! disk, and survives kill -9 and power loss alike. The connection holds an exclusive lock
//! (`locking_mode=EXCLUSIVE`), so a second lxbridge on the same `data_dir` is refused at start.
//!
//! Tables (see docs/internals.md): `queue` (changes waiting for a target, in order), `retry`
//! (changes waiting out a retry delay), `dlq`, `ids` (idempotency keys), `counters` (node seqs,
//! inbox numbers), `objects` (status per target and history of an object), `marks`
//! (delivery marks), `remap`, `groups` (the state of an object in a `[[group]]`),
//! `content_hashes` (what each object of a CommerceML source looked like when last accepted).
//! Every table is `CREATE TABLE IF NOT EXISTS`, so a database made by an older lxbridge gets
//! the tables it lacks when opened.

use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;
use tracing::{error, info};

pub use crate::broker::sqlite::EmbeddedBroker;
pub use crate::store::sqlite::EmbeddedStore;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("embedded database {path}: {message}")]
    Open { path: String, message: String },
    #[error("embedded database: {0}")]
    Call(String),
    #[error("embedded database: the transaction did not commit (disk full, or an I/O error)")]
    NotCommitted,
}

/// A call the database thread runs inside the current transaction; it returns what to do
/// once the transaction has committed (`true`) or failed (`false`).
type Job = Box<dyn FnOnce(&Connection) -> Box<dyn FnOnce(bool) + Send> + Send>;

enum Msg {
    Job(Job),
    Close(oneshot::Sender<()>),
}

/// Calls the database thread takes into one transaction, at most.
const MAX_BATCH: usize = 2048;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    target TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    first_failed INTEGER,
    alone INTEGER NOT NULL DEFAULT 0,
    body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS queue_target ON queue(target, id);
CREATE TABLE IF NOT EXISTS retry (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    target TEXT NOT NULL,
    step INTEGER NOT NULL,
    due INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    first_failed INTEGER,
    alone INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL,
    body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS retry_due ON retry(due, id);
CREATE INDEX IF NOT EXISTS retry_target ON retry(target);
CREATE TABLE IF NOT EXISTS dlq (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    target TEXT NOT NULL,
    change_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    ref TEXT NOT NULL,
    source TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    error TEXT NOT NULL,
    first_failed INTEGER NOT NULL,
    dead_at INTEGER NOT NULL,
    body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS dlq_target ON dlq(target, id);
CREATE TABLE IF NOT EXISTS ids (
    node TEXT NOT NULL,
    id TEXT NOT NULL,
    accepted INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    PRIMARY KEY (node, id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS objects (
    ref TEXT PRIMARY KEY,
    statuses TEXT NOT NULL,
    history TEXT NOT NULL,
    expires INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS marks (
    target TEXT NOT NULL,
    source TEXT NOT NULL,
    ref TEXT NOT NULL,
    type TEXT NOT NULL,
    seq INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    PRIMARY KEY (target, source, ref, type)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS groups (
    key TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    expires INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS remap (
    target TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (target, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS content_hashes (
    source TEXT NOT NULL,
    kind TEXT NOT NULL,
    ref TEXT NOT NULL,
    hash TEXT NOT NULL,
    PRIMARY KEY (source, kind, ref)) WITHOUT ROWID;
";

/// The database file inside `data_dir`.
pub fn db_path(data_dir: &Path) -> PathBuf {
    data_dir.join("lxbridge.sqlite3")
}

/// The embedded database: a handle to the thread that owns the connection.
pub struct Db {
    jobs: Mutex<Option<mpsc::Sender<Msg>>>,
    healthy: AtomicBool,
    path: String,
}

impl Db {
    /// Opens (creating if needed) the database in `data_dir` and starts its thread.
    pub fn open(data_dir: &Path) -> Result<std::sync::Arc<Db>, DbError> {
        let path = db_path(data_dir);
        let shown = path.display().to_string();
        let fail = |message: String| DbError::Open {
            path: shown.clone(),
            message,
        };
        std::fs::create_dir_all(data_dir)
            .map_err(|e| fail(format!("cannot create {}: {e}", data_dir.display())))?;
        let conn = Connection::open(&path).map_err(|e| fail(e.to_string()))?;
        // Nothing else may use the file: fail at once rather than wait for a lock.
        let setup = |conn: &Connection| -> rusqlite::Result<()> {
            conn.busy_timeout(Duration::ZERO)?;
            conn.execute_batch(
                "PRAGMA locking_mode = EXCLUSIVE;
                 PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = FULL;
                 PRAGMA cache_size = -32768;
                 PRAGMA wal_autocheckpoint = 16384;",
            )?;
            // The first write takes the exclusive lock, kept while lxbridge runs. Pending
            // idempotency keys (`accepted = 0`) are a dead process's publishes that never
            // finished: one process per data_dir, so none is still in progress; a client's
            // retry of them is fresh.
            conn.execute_batch(&format!(
                "BEGIN IMMEDIATE; {SCHEMA} DELETE FROM ids WHERE accepted = 0; COMMIT;"
            ))
        };
        setup(&conn).map_err(|e| {
            if matches!(
                e.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            ) {
                fail("it is in use by another process (is another lxbridge running with this data_dir?)".into())
            } else {
                fail(e.to_string())
            }
        })?;
        let (tx, rx) = mpsc::channel::<Msg>();
        std::thread::Builder::new()
            .name("lxbridge-db".into())
            .spawn(move || run(conn, rx))
            .map_err(|e| fail(format!("cannot start its thread: {e}")))?;
        info!(path = %shown, "embedded database open");
        Ok(std::sync::Arc::new(Db {
            jobs: Mutex::new(Some(tx)),
            healthy: AtomicBool::new(true),
            path: shown,
        }))
    }

    /// False after a commit failed, until one succeeds again.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    /// Runs `f` on the database thread, inside that thread's next transaction, and answers
    /// once the transaction has committed. An error from `f` undoes only what `f` wrote.
    pub async fn call<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |conn: &Connection| {
            let _ = conn.execute_batch("SAVEPOINT call");
            let result = f(conn);
            if result.is_err() {
                let _ = conn.execute_batch("ROLLBACK TO call");
            }
            let _ = conn.execute_batch("RELEASE call");
            Box::new(move |committed: bool| {
                let result = match result {
                    Ok(v) if committed => Ok(v),
                    Ok(_) => Err(DbError::NotCommitted),
                    Err(e) => Err(DbError::Call(e.to_string())),
                };
                let _ = reply.send(result);
            })
        });
        {
            let guard = self.jobs.lock().expect("db sender lock");
            let Some(sender) = guard.as_ref() else {
                return Err(DbError::Call(format!("{} is closed", self.path)));
            };
            if sender.send(Msg::Job(job)).is_err() {
                return Err(DbError::Call(format!("{}: its thread stopped", self.path)));
            }
        }
        let result = answer
            .await
            .map_err(|_| DbError::Call(format!("{}: its thread stopped", self.path)))?;
        self.healthy.store(
            !matches!(result, Err(DbError::NotCommitted)),
            Ordering::SeqCst,
        );
        result
    }

    /// Finishes the calls already sent, closes the connection (releasing the lock) and
    /// stops the thread. Later calls fail.
    pub async fn close(&self) {
        let sender = self.jobs.lock().expect("db sender lock").take();
        if let Some(sender) = sender {
            let (done, closed) = oneshot::channel();
            if sender.send(Msg::Close(done)).is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(10), closed).await;
            }
        }
    }
}

/// The database thread: group commits until closed.
fn run(conn: Connection, jobs: mpsc::Receiver<Msg>) {
    let mut closing = None;
    while closing.is_none() {
        let Ok(first) = jobs.recv() else { break };
        let mut batch = Vec::new();
        match first {
            Msg::Job(job) => batch.push(job),
            Msg::Close(done) => closing = Some(done),
        }
        while closing.is_none() && batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(Msg::Job(job)) => batch.push(job),
                Ok(Msg::Close(done)) => closing = Some(done),
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let began = conn.execute_batch("BEGIN IMMEDIATE");
        let finish: Vec<_> = batch.into_iter().map(|job| job(&conn)).collect();
        let committed = began.is_ok() && conn.execute_batch("COMMIT").is_ok();
        if !committed {
            error!("embedded database: a transaction failed to commit; its calls are answered with an error");
            let _ = conn.execute_batch("ROLLBACK");
        }
        for f in finish {
            f(committed);
        }
    }
    let _ = conn.close();
    if let Some(done) = closing {
        let _ = done.send(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lxbridge-db-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// Durability rests on these settings: the WAL, fsynced at every commit.
    #[tokio::test]
    async fn commits_are_synchronous_in_wal_mode() {
        let dir = temp_dir("pragmas");
        let db = Db::open(&dir).unwrap();
        let (mode, sync, locking): (String, i64, String) = db
            .call(|c| {
                Ok((
                    c.query_row("PRAGMA journal_mode", [], |r| r.get(0))?,
                    c.query_row("PRAGMA synchronous", [], |r| r.get(0))?,
                    c.query_row("PRAGMA locking_mode", [], |r| r.get(0))?,
                ))
            })
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        assert_eq!(sync, 2, "synchronous = FULL");
        assert_eq!(locking, "exclusive");
        db.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_second_process_on_the_same_data_dir_is_refused_until_the_first_closes() {
        let dir = temp_dir("lock");
        let first = Db::open(&dir).unwrap();
        let second = Db::open(&dir).err().expect("the data_dir is locked");
        assert!(
            second.to_string().contains("in use by another process"),
            "{second}"
        );
        first.close().await;
        let again = Db::open(&dir).expect("free once the first closed");
        again.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A database made before a table existed (here `content_hashes`) gains it when opened,
    /// and keeps what it held.
    #[tokio::test]
    async fn an_older_database_gains_the_tables_it_lacks() {
        let dir = temp_dir("upgrade");
        let db = Db::open(&dir).unwrap();
        db.call(|c| {
            c.execute_batch(
                "DROP TABLE content_hashes; INSERT INTO counters (name, value) VALUES ('a', 7);",
            )
        })
        .await
        .unwrap();
        db.close().await;
        let db = Db::open(&dir).unwrap();
        let (value, hashes): (i64, i64) = db
            .call(|c| {
                Ok((
                    c.query_row("SELECT value FROM counters WHERE name = 'a'", [], |r| {
                        r.get(0)
                    })?,
                    c.query_row("SELECT count(*) FROM content_hashes", [], |r| r.get(0))?,
                ))
            })
            .await
            .unwrap();
        assert_eq!((value, hashes), (7, 0));
        db.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A failing call undoes only its own writes; the others in the same transaction stay.
    #[tokio::test]
    async fn a_failing_call_does_not_undo_its_neighbours() {
        let dir = temp_dir("savepoint");
        let db = Db::open(&dir).unwrap();
        let ok = db.call(|c| {
            c.execute("INSERT INTO counters (name, value) VALUES ('a', 1)", [])
                .map(|_| ())
        });
        let bad = db.call(|c| {
            c.execute("INSERT INTO counters (name, value) VALUES ('b', 1)", [])?;
            c.execute("INSERT INTO no_such_table VALUES (1)", [])
                .map(|_| ())
        });
        let (ok, bad) = tokio::join!(ok, bad);
        ok.unwrap();
        assert!(bad.is_err());
        let names: Vec<String> = db
            .call(|c| {
                c.prepare("SELECT name FROM counters ORDER BY name")?
                    .query_map([], |r| r.get(0))?
                    .collect()
            })
            .await
            .unwrap();
        assert_eq!(names, ["a"]);
        db.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
