//! `mode=import`: one uploaded file read as a stream ([`crate::commerceml::Reader`], on a
//! blocking thread) and accepted in chunks through the changes pipeline
//! ([`accept_changes`]), by a job that outlives the request: each request waits up to
//! `import_wait` and answers `progress` while the job works, then the job's `success` or
//! `failure`. The job's state is also a file (`jobs/<name>.json`, beaten every
//! [`BEAT`]) so another instance sharing the folder answers for it, and takes it over
//! when its beat stops.
//!
//! Per element: the hash of its content against the one last accepted for its (type, ref):
//! equal → `unchanged` (recorded, not published); else a change with the id
//! `cml-<hash of the file's ДатаФормирования and the content>`, so a file imported twice
//! (a job taken over) is not published twice. A file is `success` only when every element
//! was accepted (published with confirms), `unchanged`, unroutable or unreadable (those two
//! named in the answer); a broker or store away is waited for up to [`PATIENCE`].

use super::answer::Answer;
use super::session::{hex, write_atomically, Session};
use crate::commerceml::{Element, ReadError, Reader};
use crate::ingress::accept::{accept_changes, Unavailable, Verdict};
use crate::model::{Change, Op};
use crate::store::{HistoryEvent, Record};
use crate::AppState;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{info, warn};

/// Elements accepted per call of the pipeline.
const CHUNK: usize = 500;
/// How often a running job writes its state file.
const BEAT: Duration = Duration::from_secs(2);
/// A running job whose state file is older than this was left by a dead instance.
const STALE: Duration = Duration::from_secs(15);
/// How long a job waits for a broker or store that is away before it fails the file.
const PATIENCE: Duration = Duration::from_secs(300);

/// The jobs this process runs, by state file.
#[derive(Default)]
pub struct Imports {
    running: Mutex<HashMap<PathBuf, watch::Receiver<JobState>>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
enum JobState {
    Running { elements: u64, beat_ms: i64 },
    Success { text: String },
    Failure { text: String },
}

impl JobState {
    fn answer(&self, file: &str) -> Option<Answer> {
        match self {
            JobState::Running { .. } => None,
            JobState::Success { text } => Some(Answer::success(text.clone())),
            JobState::Failure { text } => Some(Answer::failure(text.clone())),
        }
        .map(|a| a.about(file))
    }
}

/// `mode=import&filename=<name>` in `session`, answering `progress` after `import_wait`.
pub async fn import(app: &Arc<AppState>, node: &str, session: &Session, name: &str) -> Answer {
    let cml = app.config.node(node).and_then(|n| n.commerceml.clone());
    let wait = cml
        .map(|c| c.import_wait.0)
        .unwrap_or(Duration::from_secs(2));
    import_within(app, node, session, name, wait).await
}

/// The import of `name` until it ends: its `success` or `failure`.
pub async fn import_to_end(
    app: &Arc<AppState>,
    node: &str,
    session: &Session,
    name: &str,
) -> Answer {
    import_within(app, node, session, name, PATIENCE + STALE + BEAT).await
}

async fn import_within(
    app: &Arc<AppState>,
    node: &str,
    session: &Session,
    name: &str,
    wait: Duration,
) -> Answer {
    let file = match super::session::safe_name(name) {
        Ok(file) => file,
        Err(bad) => return Answer::failure(bad.russian(name)).logged(node, bad.english(name)),
    };
    let state_file = session
        .jobs()
        .join(format!("{}.json", hex(&digest(name.as_bytes())[..8])));
    let receiver = {
        let running = app.commerceml.running.lock().expect("imports lock");
        running.get(&state_file).cloned()
    };
    let receiver = match receiver {
        Some(receiver) => receiver,
        None => match read_state(&state_file) {
            Some(JobState::Running { elements, beat_ms }) if !stale(beat_ms) => {
                return elsewhere(&state_file, elements, wait, name).await
            }
            Some(done @ (JobState::Success { .. } | JobState::Failure { .. })) => {
                return done.answer(name).expect("a finished job answers")
            }
            _ => start(app, node, session, &file, name, state_file),
        },
    };
    wait_for(receiver, wait, name).await
}

fn stale(beat_ms: i64) -> bool {
    crate::clock::unix_ms_now() - beat_ms > STALE.as_millis() as i64
}

fn read_state(path: &Path) -> Option<JobState> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

fn write_state(path: &Path, state: &JobState) {
    let bytes = serde_json::to_vec(state).expect("job state serialises");
    if let Err(e) = std::fs::create_dir_all(path.parent().expect("jobs folder"))
        .and_then(|_| write_atomically(path, &bytes))
    {
        warn!(path = %path.display(), error = %e, "could not write a CommerceML import's state");
    }
}

fn progress(elements: u64, name: &str) -> Answer {
    Answer::progress(format!("обработано элементов: {elements}")).about(name)
}

/// Another instance runs the job: its state file answers.
async fn elsewhere(state_file: &Path, elements: u64, wait: Duration, name: &str) -> Answer {
    tokio::time::sleep(wait).await;
    match read_state(state_file) {
        Some(JobState::Running { elements, .. }) => progress(elements, name),
        Some(done) => done.answer(name).expect("a finished job answers"),
        None => progress(elements, name),
    }
}

async fn wait_for(mut receiver: watch::Receiver<JobState>, wait: Duration, name: &str) -> Answer {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let state = receiver.borrow_and_update().clone();
        if let Some(answer) = state.answer(name) {
            return answer;
        }
        let JobState::Running { elements, .. } = state else {
            unreachable!()
        };
        match tokio::time::timeout_at(deadline, receiver.changed()).await {
            Ok(Ok(())) => continue,
            Ok(Err(_)) | Err(_) => return progress(elements, name),
        }
    }
}

/// Claims the job and runs it on a task of its own.
fn start(
    app: &Arc<AppState>,
    node: &str,
    session: &Session,
    file: &Path,
    name: &str,
    state_file: PathBuf,
) -> watch::Receiver<JobState> {
    let first = JobState::Running {
        elements: 0,
        beat_ms: crate::clock::unix_ms_now(),
    };
    write_state(&state_file, &first);
    let (sender, receiver) = watch::channel(first);
    app.commerceml
        .running
        .lock()
        .expect("imports lock")
        .insert(state_file.clone(), receiver.clone());
    let job = Job {
        app: app.clone(),
        node: node.to_string(),
        session: session.clone(),
        path: session.files().join(file),
        name: name.to_string(),
        state_file,
        sender,
        tally: Tally::default(),
        beat: Instant::now(),
    };
    tokio::spawn(job.run());
    receiver
}

/// What a file's elements came to.
#[derive(Debug, Default)]
struct Tally {
    accepted: u64,
    unchanged: u64,
    duplicate: u64,
    unroutable: HashMap<&'static str, u64>,
    /// Unreadable elements, in English and Russian.
    unreadable: Vec<(String, String)>,
}

impl Tally {
    fn elements(&self) -> u64 {
        self.accepted
            + self.unchanged
            + self.duplicate
            + self.unroutable.values().sum::<u64>()
            + self.unreadable.len() as u64
    }

    /// The text after `success`: counts, then what was not taken.
    fn russian(&self) -> String {
        let mut text = format!(
            "принято элементов: {}, без изменений: {}",
            self.accepted + self.duplicate,
            self.unchanged
        );
        for (kind, n) in &self.unroutable {
            text.push_str(&format!(
                "\nне переданы (нет маршрута для {kind}): {n}; проверьте [[route]] в настройках lxbridge"
            ));
        }
        if !self.unreadable.is_empty() {
            text.push_str(&format!("\nпропущено элементов: {}", self.unreadable.len()));
        }
        for (_, russian) in self.unreadable.iter().take(10) {
            text.push_str(&format!("\n{russian}"));
        }
        text
    }
}

struct Job {
    app: Arc<AppState>,
    node: String,
    session: Session,
    path: PathBuf,
    name: String,
    state_file: PathBuf,
    sender: watch::Sender<JobState>,
    tally: Tally,
    beat: Instant,
}

/// Elements as the reader gives them, a chunk at a time, and the file's date.
struct Chunk {
    formed: String,
    items: Vec<Result<Element, ReadError>>,
}

impl Job {
    async fn run(mut self) {
        let outcome = self.work().await;
        let end = match outcome {
            Ok(()) => {
                info!(node = %self.node, file = %self.name, accepted = self.tally.accepted, unchanged = self.tally.unchanged,
                    duplicate = self.tally.duplicate, unroutable = self.tally.unroutable.values().sum::<u64>(),
                    unreadable = self.tally.unreadable.len(), "CommerceML file imported");
                for (english, _) in &self.tally.unreadable {
                    warn!(node = %self.node, file = %self.name, "element skipped: {english}");
                }
                self.forget_file();
                JobState::Success {
                    text: self.tally.russian(),
                }
            }
            Err((english, russian)) => {
                warn!(node = %self.node, file = %self.name, error = %english, "CommerceML import failed");
                JobState::Failure { text: russian }
            }
        };
        write_state(&self.state_file, &end);
        self.session.touch();
        let _ = self.sender.send(end);
        self.app
            .commerceml
            .running
            .lock()
            .expect("imports lock")
            .remove(&self.state_file);
    }

    /// An imported file is removed, unless `keep_files` keeps it for audit.
    fn forget_file(&self) {
        let keep = self
            .app
            .config
            .node(&self.node)
            .and_then(|n| n.commerceml.as_ref());
        if keep.is_some_and(|c| c.keep_files.0.is_zero()) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    async fn work(&mut self) -> Result<(), (String, String)> {
        if !self.path.exists() {
            let session = self.session.clone();
            let limit = self.session_limit();
            tokio::task::spawn_blocking(move || super::unzip::extract_all(&session, limit))
                .await
                .expect("unzip does not panic")?;
        }
        let input = std::fs::File::open(&self.path).map_err(|e| {
            (
                format!("file {:?} was not uploaded in this session: {e}", self.name),
                format!(
                    "файл «{}» не загружен в этом сеансе обмена: начните обмен заново",
                    self.name
                ),
            )
        })?;
        let (chunks, mut receiver) = tokio::sync::mpsc::channel::<Chunk>(2);
        let reading = tokio::task::spawn_blocking(move || read_chunks(input, chunks));
        while let Some(chunk) = receiver.recv().await {
            self.take(chunk).await?;
            self.beat();
        }
        reading.await.expect("the reader does not panic")
    }

    fn session_limit(&self) -> u64 {
        let cml = self
            .app
            .config
            .node(&self.node)
            .and_then(|n| n.commerceml.as_ref());
        cml.map(|c| c.session_limit).unwrap_or(u64::MAX)
    }

    fn beat(&mut self) {
        let state = JobState::Running {
            elements: self.tally.elements(),
            beat_ms: crate::clock::unix_ms_now(),
        };
        if self.beat.elapsed() >= BEAT {
            write_state(&self.state_file, &state);
            self.beat = Instant::now();
        }
        let _ = self.sender.send(state);
    }

    /// One chunk: unreadable ones recorded, unchanged ones recorded, the rest accepted.
    async fn take(&mut self, chunk: Chunk) -> Result<(), (String, String)> {
        let mut elements = Vec::with_capacity(chunk.items.len());
        let mut records = Vec::new();
        for item in chunk.items {
            match item {
                Ok(element) => elements.push(element),
                Err(ReadError::File(e)) => {
                    return Err((format!("{}: {e}", self.name), e.russian()));
                }
                Err(ReadError::Element(e)) => {
                    records.push(self.event(&self.name, "rejected", e.to_string()));
                    self.count("rejected", 1);
                    self.tally.unreadable.push((e.to_string(), e.russian()));
                }
            }
        }
        let changes = elements
            .into_iter()
            .map(|e| Hashed::of(e, &chunk.formed))
            .collect::<Vec<_>>();
        let fresh = self.changed_only(changes, &mut records).await?;
        self.record(records).await;
        self.accept(fresh).await
    }

    fn event(&self, reference: &str, event: &str, detail: String) -> Record {
        Record {
            reference: reference.to_string(),
            event: Some(HistoryEvent {
                at: crate::clock::rfc3339_now(),
                target: self.node.clone(),
                event: event.into(),
                detail,
            }),
            ..Record::default()
        }
    }

    async fn record(&self, records: Vec<Record>) {
        if records.is_empty() {
            return;
        }
        if let Err(e) = self.app.store.record(records).await {
            warn!(node = %self.node, error = %e, "could not record unchanged or unreadable CommerceML elements");
        }
    }

    /// Leaves out (and records) the elements whose content is the one last accepted.
    async fn changed_only(
        &mut self,
        changes: Vec<Hashed>,
        records: &mut Vec<Record>,
    ) -> Result<Vec<Hashed>, (String, String)> {
        let keys: Vec<(&str, &str)> = changes
            .iter()
            .map(|h| (h.change.kind.as_str(), h.change.reference.as_str()))
            .collect();
        let started = Instant::now();
        let stored = loop {
            match self.app.store.content_hashes(&self.node, &keys).await {
                Ok(stored) => break stored,
                Err(e) => self.wait_out(started, e.to_string()).await?,
            }
        };
        let mut fresh = Vec::with_capacity(changes.len());
        for (hashed, stored) in changes.into_iter().zip(stored) {
            if stored.as_deref() == Some(hashed.hash.as_str()) {
                let detail = format!(
                    "{}: {} {:?}: same content as last accepted, not delivered again",
                    self.name, hashed.change.kind, hashed.change.reference
                );
                records.push(self.event(&hashed.change.reference, "unchanged", detail));
                self.tally.unchanged += 1;
                self.count("unchanged", 1);
            } else {
                fresh.push(hashed);
            }
        }
        Ok(fresh)
    }

    fn count(&self, outcome: &str, n: u64) {
        self.app
            .metrics
            .commerceml
            .elements
            .with_label_values(&[&self.node, outcome])
            .inc_by(n);
    }

    /// Waits a little for a broker or store that is away, or gives up after [`PATIENCE`].
    async fn wait_out(&mut self, started: Instant, why: String) -> Result<(), (String, String)> {
        if started.elapsed() > PATIENCE {
            return Err((
                format!("{}: gave up after {PATIENCE:?}: {why}", self.name),
                format!(
                    "файл «{}»: брокер или хранилище lxbridge недоступны ({why}); принятое сохранено, повторите обмен позже",
                    self.name
                ),
            ));
        }
        self.beat();
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok(())
    }

    /// Accepts `changes` (retrying what the broker refused), then keeps their hashes.
    async fn accept(&mut self, mut pending: Vec<Hashed>) -> Result<(), (String, String)> {
        let started = Instant::now();
        while !pending.is_empty() {
            let changes = pending.iter().map(|h| h.change.clone()).collect();
            let verdicts = match accept_changes(&self.app, &self.node, changes).await {
                Ok(verdicts) => verdicts,
                Err(Unavailable(why)) => {
                    self.wait_out(started, why).await?;
                    continue;
                }
            };
            let mut retry = Vec::new();
            let mut kept = Vec::new();
            let mut refused = None;
            for (hashed, verdict) in pending.into_iter().zip(verdicts) {
                match verdict {
                    Verdict::Accepted => {
                        self.tally.accepted += 1;
                        self.count("accepted", 1);
                        kept.push(hashed);
                    }
                    Verdict::Duplicate => {
                        self.tally.duplicate += 1;
                        self.count("duplicate", 1);
                        kept.push(hashed);
                    }
                    Verdict::Unroutable => {
                        *self.tally.unroutable.entry(hashed.kind).or_default() += 1;
                        self.count("unroutable", 1);
                    }
                    Verdict::Rejected(why) => {
                        refused = Some(why);
                        retry.push(hashed);
                    }
                }
            }
            self.keep(&kept).await;
            pending = retry;
            if let Some(why) = refused {
                self.wait_out(started, why).await?;
            }
        }
        Ok(())
    }

    async fn keep(&self, kept: &[Hashed]) {
        let entries: Vec<(&str, &str, &str)> = kept
            .iter()
            .map(|h| {
                (
                    h.change.kind.as_str(),
                    h.change.reference.as_str(),
                    h.hash.as_str(),
                )
            })
            .collect();
        if let Err(e) = self
            .app
            .store
            .keep_content_hashes(&self.node, &entries)
            .await
        {
            warn!(node = %self.node, error = %e, "could not keep CommerceML content hashes; the next upload delivers these again");
        }
    }
}

/// A change of an element with the hash of its content.
pub(crate) struct Hashed {
    pub(crate) kind: &'static str,
    pub(crate) hash: String,
    pub(crate) change: Change,
}

impl Hashed {
    /// The change of `element`, its id from `formed` (the file's ДатаФормирования) and the
    /// content, so that the same file read twice gives the same ids.
    pub(crate) fn of(element: Element, formed: &str) -> Hashed {
        let content = serde_json::to_vec(&element.data).expect("data serialises");
        let mut bytes = Vec::with_capacity(content.len() + 128);
        for part in [
            element.kind.as_bytes(),
            element.reference.as_bytes(),
            &content,
        ] {
            bytes.extend_from_slice(part);
            bytes.push(0x1f);
        }
        bytes.push(element.deleted as u8);
        let hash = hex(&digest(&bytes)[..16]);
        let id = hex(&digest(format!("{formed}\u{1f}{hash}").as_bytes())[..16]);
        Hashed {
            kind: element.kind,
            hash,
            change: Change {
                id: Some(format!("cml-{id}")),
                kind: element.kind.to_string(),
                reference: element.reference,
                op: if element.deleted {
                    Op::Delete
                } else {
                    Op::Upsert
                },
                data: Some(element.data),
                seq: None,
                ts: None,
                initial: false,
            },
        }
    }
}

fn digest(bytes: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .to_vec()
}

/// The reader's thread: elements in chunks of [`CHUNK`]; an `Ид` longer than a ref may be
/// is an unreadable element. Stops when the job is gone.
fn read_chunks(
    input: std::fs::File,
    chunks: tokio::sync::mpsc::Sender<Chunk>,
) -> Result<(), (String, String)> {
    let mut reader = Reader::new(std::io::BufReader::with_capacity(64 * 1024, input));
    let mut items = Vec::with_capacity(CHUNK);
    loop {
        let next = reader.next();
        let end = next.is_none();
        if let Some(item) = next {
            items.push(item.and_then(long_reference));
        }
        if items.len() >= CHUNK || (end && !items.is_empty()) {
            let formed = reader.header().formed.clone().unwrap_or_default();
            let chunk = Chunk {
                formed,
                items: std::mem::take(&mut items),
            };
            if chunks.blocking_send(chunk).is_err() {
                return Ok(());
            }
        }
        if end {
            return Ok(());
        }
    }
}

/// An `Ид` longer than the 256 characters a ref may have is an unreadable element.
fn long_reference(element: Element) -> Result<Element, ReadError> {
    if element.reference.chars().count() <= REF_CHARS_MAX {
        return Ok(element);
    }
    Err(ReadError::Element(crate::commerceml::ElementError {
        kind: element.kind,
        line: element.line,
        problem: crate::commerceml::ElementProblem::LongId {
            limit: REF_CHARS_MAX,
        },
    }))
}

/// The longest ref a change may have (docs/api.md).
const REF_CHARS_MAX: usize = 256;
