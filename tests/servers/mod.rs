//! Private servers for fault tests: a test CA made with the `openssl` CLI ([`TestCa`]), a
//! RabbitMQ cluster of 1 or 3 nodes, optionally with a TLS listener ([`RabbitCluster`]), a
//! plain or TLS-only Redis ([`RedisServer`]) and a Redis master + replica watched by three
//! sentinels ([`Sentinels`]).
//!
//! Plain synchronous code (std::process, std::thread::sleep): from a tokio test, wrap calls
//! in `spawn_blocking`. Every value starts its own processes on its own ports (bound to
//! 127.0.0.1:0 and released) in its own directory `<temp>/lxt-<kind>-<tag>`; dropping it
//! (also while a test panics) kills them with SIGKILL by PID, waits for them and removes the
//! directory. The machine's own RabbitMQ (5672, rabbit@localhost, its epmd on 4369) and Redis
//! (6379) are never touched.
//!
//! Facts that matter (RabbitMQ 3.10.8, Erlang 25, Redis 7.0.15 from Debian; 2 cores):
//! - RabbitMQ is started as `/usr/lib/rabbitmq/bin/rabbitmq-server` (not the /usr/sbin wrapper,
//!   which may `su` to user rabbitmq) in the foreground, with a cleared environment: its own
//!   `HOME` holding `.erlang.cookie` (0400) shared by the nodes and `rabbitmqctl`, its own
//!   `RABBITMQ_CONF_ENV_FILE` (the machine's names the node rabbit@localhost), config file,
//!   `enabled_plugins` = `[].` (no management listener), mnesia and pid file, and its own
//!   `epmd -port N` with `ERL_EPMD_PORT=N`. The script stays as the parent of beam.smp; the
//!   beam's OS pid is read from `RABBITMQ_PID_FILE`.
//! - A node boots in ~9 s alone; every `rabbitmqctl` call costs ~1.3 s of CPU (it boots an
//!   Erlang VM), so the harness calls it sparingly. Nodes 2..n are joined with `stop_app`,
//!   `join_cluster`, `start_app`. A node killed with -9 rejoins by itself when restarted with
//!   its data dir, as long as another member is running.
//! - Sentinels find the replica from the master's INFO and each other through hello messages
//!   (every 2 s); with `down-after-milliseconds 1000` a failover takes a few seconds.
//! - Leftovers of a test process killed outright (no Drop) are reaped by the next harness:
//!   any `lxt-*` directory whose `owner` pid is dead has the processes whose working
//!   directory lies inside it killed, then is removed.
#![allow(dead_code)]

use serde_json::Value;
use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};
use std::thread::{sleep, JoinHandle};
use std::time::{Duration, Instant};

/// Where Debian keeps RabbitMQ's real scripts (not the `su`-ing wrappers in /usr/sbin).
const RABBIT_BIN: &str = "/usr/lib/rabbitmq/bin";
/// How long a RabbitMQ node may take to boot or a cluster to agree.
const RABBIT_BOOT: Duration = Duration::from_secs(120);
/// How long one `rabbitmqctl` call may take.
const CTL_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a redis-server may take to answer PING.
const REDIS_BOOT: Duration = Duration::from_secs(20);
/// How long one `redis-cli` or `openssl` call may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------

/// A random 8-hex-digit tag (for names, dirs, cookies).
pub fn tag() -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    h.write_u128(now.unwrap_or_default().as_nanos());
    format!("{:08x}", h.finish() as u32)
}

/// A free TCP port on 127.0.0.1 (bound to port 0 and released), never the same one twice
/// in this process, never in rabbitmqctl's own distribution range 35672..=35682.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().unwrap().port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !(35672..=35682).contains(&port) && !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_open(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
}

/// Calls `f` every 100 ms until it gives `Some`, panicking after `timeout`.
pub fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = f() {
            return value;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        sleep(Duration::from_millis(100));
    }
}

/// Whether process `pid` exists and is not a zombie.
pub fn is_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// `kill -9 pid` (errors ignored: it may be gone already).
fn kill9(pid: u32) {
    let _ = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Waits up to `timeout` for `pid` to be gone; whether it is.
fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let start = Instant::now();
    while is_alive(pid) && start.elapsed() < timeout {
        sleep(Duration::from_millis(20));
    }
    !is_alive(pid)
}

/// The live processes whose working directory is `dir` or inside it (ours, by construction:
/// every process the harness starts runs in its own directory).
pub fn processes_under(dir: &Path) -> Vec<u32> {
    let dir = dir.to_string_lossy().into_owned();
    let inside = |cwd: &str| {
        cwd.strip_prefix(&dir)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['/', ' ']))
    };
    let me = std::process::id();
    let entries = fs::read_dir("/proc").into_iter().flatten().flatten();
    entries
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me && is_alive(pid))
        .filter(|pid| {
            fs::read_link(format!("/proc/{pid}/cwd"))
                .is_ok_and(|cwd| inside(&cwd.to_string_lossy()))
        })
        .collect()
}

/// Kills (-9) whatever still runs inside `dir`, waits for it, and removes `dir`.
fn cleanup(dir: &Path) {
    let pids = processes_under(dir);
    pids.iter().for_each(|&pid| kill9(pid));
    pids.iter().for_each(|&pid| {
        wait_gone(pid, Duration::from_secs(10));
    });
    let _ = fs::remove_dir_all(dir);
}

/// Once per process: kills and removes what test processes that died without dropping
/// their harness left behind (see the module doc).
fn reap_orphans() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let entries = fs::read_dir(std::env::temp_dir()).into_iter().flatten();
        for entry in entries.flatten() {
            let dir = entry.path();
            let ours = entry.file_name().to_string_lossy().starts_with("lxt-");
            let owner = fs::read_to_string(dir.join("owner")).ok();
            let owner = owner.and_then(|o| o.trim().parse::<u32>().ok());
            if ours && owner.is_some_and(|pid| !is_alive(pid)) {
                eprintln!("[servers] reaping leftovers in {}", dir.display());
                cleanup(&dir);
            }
        }
    });
}

/// A fresh directory `<temp>/lxt-<kind>-<tag>` with an `owner` file naming this process.
fn private_dir(kind: &str) -> PathBuf {
    reap_orphans();
    let dir = std::env::temp_dir().join(format!("lxt-{kind}-{}", tag()));
    fs::create_dir_all(&dir).expect("create a private temp dir");
    let dir = dir.canonicalize().unwrap();
    fs::write(dir.join("owner"), std::process::id().to_string()).unwrap();
    dir
}

/// Sets the mode of `path`.
fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// The last `n` lines of a log file (for panic messages: the directory goes on drop).
fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Reads a child's pipe to the end on a thread.
fn drain(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    })
}

/// Runs `cmd` (stdin empty), killing it after `timeout`: `Ok(stdout)` if it succeeded,
/// else `Err` with the command line, its status, stderr and stdout.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Result<String, String> {
    let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy()).collect();
    let what = format!("{} {}", cmd.get_program().to_string_lossy(), args.join(" "));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: {e}"))?;
    let (out, err) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| format!("{what}: {e}"))? {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        sleep(Duration::from_millis(20));
    };
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    match status {
        Some(s) if s.success() => Ok(out),
        Some(s) => Err(format!("{what}: {s}\n{err}{out}")),
        None => Err(format!("{what}: timed out after {timeout:?}\n{err}{out}")),
    }
}

/// A server process the harness spawned, output to a log file; SIGKILLed and reaped on drop.
struct Daemon {
    child: Child,
    name: String,
    log: PathBuf,
}

impl Daemon {
    /// Spawns `cmd` with stdin empty and stdout+stderr appended to `log`.
    fn spawn(cmd: &mut Command, log: &Path, name: &str) -> Daemon {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let (name, log) = (name.to_string(), log.to_path_buf());
        Daemon { child, name, log }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Panics with the tail of the log if the process has exited.
    fn check_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            let log = tail(&self.log, 40);
            panic!("{} exited ({status}); its log ends:\n{log}", self.name);
        }
    }

    /// Waits up to `timeout` for the process to exit by itself, then kills it; reaps it.
    fn stop_after(&mut self, timeout: Duration) {
        let start = Instant::now();
        while matches!(self.child.try_wait(), Ok(None)) && start.elapsed() < timeout {
            sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// TestCa
// ---------------------------------------------------------------------------------------

/// The `openssl` config for the CA and the two leaf certificates.
const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = placeholder
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

/// A throw-away CA (ECDSA P-256, valid 30 days) with a server certificate for
/// `DNS:localhost, IP:127.0.0.1` and a client certificate, as PEM files; keys are PKCS#8
/// ("BEGIN PRIVATE KEY", what rustls reads). All files are world-readable.
pub struct TestCa {
    dir: PathBuf,
}

impl TestCa {
    /// A new CA with its server and client certificates.
    pub fn new() -> TestCa {
        TestCa::make("lxbridge test CA")
    }

    /// Another, unrelated CA (for "wrong CA" tests).
    pub fn other() -> TestCa {
        TestCa::make("unrelated test CA")
    }

    fn make(cn: &str) -> TestCa {
        let ca = TestCa {
            dir: private_dir("ca"),
        };
        fs::write(ca.dir.join("openssl.cnf"), OPENSSL_CNF).unwrap();
        chmod(&ca.dir, 0o755);
        let subject = format!("/CN={cn} {}", tag());
        let ca_args = ["-x509", "-extensions", "ca", "-days", "30"];
        ca.req(&ca_args, "ca", &subject, "ca.pem");
        ca.issue("server", "/CN=localhost");
        ca.issue("client", "/CN=lxbridge test client");
        for name in ["ca", "server", "client"] {
            chmod(&ca.dir.join(format!("{name}.pem")), 0o644);
            chmod(&ca.dir.join(format!("{name}.key")), 0o644);
        }
        ca
    }

    /// `openssl req` with a new P-256 key in `<name>.key`, writing `out`.
    fn req(&self, mode: &[&str], name: &str, subject: &str, out: &str) {
        let key = format!("{name}.key");
        let mut args = vec!["req", "-config", "openssl.cnf"];
        args.extend(mode);
        args.extend([
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ]);
        args.extend(["-keyout", &key, "-subj", subject, "-out", out]);
        self.run(&args);
    }

    /// Makes `<ext>.key` and `<ext>.pem`, signed by the CA with extensions section `ext`.
    fn issue(&self, ext: &str, subject: &str) {
        let (csr, pem) = (format!("{ext}.csr"), format!("{ext}.pem"));
        self.req(&["-new"], ext, subject, &csr);
        let serial = format!("0x{}", tag());
        self.run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-set_serial",
            &serial,
            "-days",
            "30",
            "-extfile",
            "openssl.cnf",
            "-extensions",
            ext,
            "-out",
            &pem,
        ]);
    }

    /// Runs `openssl ARGS…` in the CA's directory, panicking on failure.
    fn run(&self, args: &[&str]) {
        let mut cmd = Command::new("openssl");
        cmd.current_dir(&self.dir).args(args);
        run_timeout(&mut cmd, CLI_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    }

    /// The CA certificate (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The server certificate (PEM; SAN DNS:localhost, IP:127.0.0.1).
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }

    /// The server key (PKCS#8 PEM).
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    /// The client certificate (PEM; extendedKeyUsage clientAuth).
    pub fn client_cert(&self) -> PathBuf {
        self.dir.join("client.pem")
    }

    /// The client key (PKCS#8 PEM).
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client.key")
    }

    /// Copies the CA, server certificate and key into `dest` (created, mode 0755, files
    /// 0644) as ca.pem, server.pem, server.key, so a server outlives this value.
    fn copy_server_files(&self, dest: &Path) {
        fs::create_dir_all(dest).unwrap();
        chmod(dest, 0o755);
        for name in ["ca.pem", "server.pem", "server.key"] {
            fs::copy(self.dir.join(name), dest.join(name)).unwrap();
            chmod(&dest.join(name), 0o644);
        }
    }
}

impl Default for TestCa {
    fn default() -> Self {
        TestCa::new()
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------
// RabbitCluster
// ---------------------------------------------------------------------------------------

/// One node of a [`RabbitCluster`].
struct Node {
    name: String,
    dir: PathBuf,
    amqp_port: u16,
    dist_port: u16,
    tls_port: Option<u16>,
    /// The `rabbitmq-server` script: it stays in the foreground as beam's parent.
    script: Option<Daemon>,
    /// beam.smp's OS pid, from `RABBITMQ_PID_FILE`; `None` while the node is down.
    pid: Option<u32>,
}

/// A private RabbitMQ cluster: n nodes `lxt<tag>-<k>@localhost` (k = 1..=n; methods take
/// the index k-1), each with its own AMQP (and TLS) port, distribution port, config and
/// data, sharing one private epmd and Erlang cookie. Dropping it kills everything.
pub struct RabbitCluster {
    dir: PathBuf,
    epmd_port: u16,
    nodes: Vec<Node>,
    epmd: Option<Daemon>,
}

impl RabbitCluster {
    /// Starts `n` nodes (booted in parallel), joins nodes 2..n to node 1 and waits until
    /// `cluster_status` shows all n running. With `tls`, every node also has a TLS AMQP
    /// listener (server certificate of `tls`, no client certificate asked for).
    pub fn start(n: usize, tls: Option<&TestCa>) -> RabbitCluster {
        assert!(n >= 1, "a cluster needs a node");
        let started = Instant::now();
        let mut cluster = RabbitCluster {
            dir: private_dir("rabbit"),
            epmd_port: free_port(),
            nodes: Vec::new(),
            epmd: None,
        };
        cluster.write_shared_files(tls);
        cluster.start_epmd();
        let prefix = format!("lxt{}", tag());
        for k in 1..=n {
            cluster.add_node(format!("{prefix}-{k}@localhost"), tls.is_some());
        }
        (0..n).for_each(|i| cluster.spawn_node(i));
        (0..n).for_each(|i| cluster.wait_booted(i));
        let booted = started.elapsed();
        cluster.join_all();
        cluster.wait_all_running();
        eprintln!(
            "[servers] RabbitMQ cluster of {n} ({prefix}, tls: {}) started in {:.1?} \
             (nodes booted after {booted:.1?})",
            tls.is_some(),
            started.elapsed()
        );
        cluster
    }

    /// The cookie, the empty env file, `enabled_plugins` and a copy of the TLS files.
    fn write_shared_files(&self, tls: Option<&TestCa>) {
        let home = self.dir.join("home");
        fs::create_dir_all(&home).unwrap();
        let cookie = home.join(".erlang.cookie");
        fs::write(&cookie, format!("LXT{}{}", tag(), tag()).to_uppercase()).unwrap();
        chmod(&cookie, 0o400);
        fs::write(self.dir.join("rabbitmq-env.conf"), "").unwrap();
        fs::write(self.dir.join("enabled_plugins"), "[].\n").unwrap();
        if let Some(ca) = tls {
            ca.copy_server_files(&self.dir.join("tls"));
        }
    }

    /// Starts the cluster's own epmd on `epmd_port`.
    fn start_epmd(&mut self) {
        let epmd = fs::read_dir("/usr/lib/erlang")
            .expect("Erlang in /usr/lib/erlang")
            .flatten()
            .map(|e| e.path().join("bin/epmd"))
            .find(|p| p.exists() && p.to_string_lossy().contains("erts-"))
            .expect("/usr/lib/erlang/erts-*/bin/epmd");
        let mut cmd = Command::new(epmd);
        cmd.current_dir(&self.dir).args([
            "-port",
            &self.epmd_port.to_string(),
            "-address",
            "127.0.0.1",
        ]);
        let mut daemon = Daemon::spawn(&mut cmd, &self.dir.join("epmd.log"), "epmd");
        poll("the private epmd", Duration::from_secs(10), || {
            daemon.check_running();
            port_open(self.epmd_port).then_some(())
        });
        self.epmd = Some(daemon);
    }

    /// Creates node `name`'s directory, ports and config file.
    fn add_node(&mut self, name: String, tls: bool) {
        let dir = self.dir.join(name.split('@').next().unwrap());
        fs::create_dir_all(&dir).unwrap();
        let node = Node {
            name,
            dir,
            amqp_port: free_port(),
            dist_port: free_port(),
            tls_port: tls.then(free_port),
            script: None,
            pid: None,
        };
        fs::write(node.dir.join("rabbitmq.conf"), self.config(&node)).unwrap();
        self.nodes.push(node);
    }

    /// A node's rabbitmq.conf: logs to the console (the node's console.log), TLS listener.
    fn config(&self, node: &Node) -> String {
        let mut conf = String::from("log.console = true\nlog.console.level = info\n");
        conf += "log.file = false\nloopback_users.guest = true\n";
        if let Some(port) = node.tls_port {
            let tls = |file: &str| self.dir.join("tls").join(file).display().to_string();
            conf += &format!(
                "listeners.ssl.default = 127.0.0.1:{port}\n\
                 ssl_options.cacertfile = {}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n\
                 ssl_options.verify = verify_none\n\
                 ssl_options.fail_if_no_peer_cert = false\n",
                tls("ca.pem"),
                tls("server.pem"),
                tls("server.key"),
            );
        }
        conf
    }

    /// A command for one of RabbitMQ's scripts with the cluster's environment only.
    fn rabbit_cmd(&self, script: &str) -> Command {
        let mut cmd = Command::new(Path::new(RABBIT_BIN).join(script));
        let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/bin".into());
        cmd.env_clear()
            .current_dir(&self.dir)
            .env("PATH", path)
            .env("HOME", self.dir.join("home"))
            .env("LANG", "C.UTF-8")
            .env("LC_ALL", "C.UTF-8")
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("RABBITMQ_CONF_ENV_FILE", self.dir.join("rabbitmq-env.conf"));
        cmd
    }

    /// Starts node `i`'s `rabbitmq-server` (does not wait).
    fn spawn_node(&mut self, i: usize) {
        let node = &self.nodes[i];
        let _ = fs::remove_file(node.dir.join("pid"));
        let mut cmd = self.rabbit_cmd("rabbitmq-server");
        cmd.current_dir(&node.dir)
            .env("RABBITMQ_NODENAME", &node.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", node.amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", node.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", node.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", node.dir.join("log"))
            .env("RABBITMQ_PID_FILE", node.dir.join("pid"))
            .env("RABBITMQ_CONFIG_FILE", node.dir.join("rabbitmq.conf"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.dir.join("enabled_plugins"),
            )
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            );
        let log = node.dir.join("console.log");
        let script = Daemon::spawn(&mut cmd, &log, &node.name);
        self.nodes[i].script = Some(script);
    }

    /// Waits for node `i`'s pid file, then for its AMQP (and TLS) listeners.
    fn wait_booted(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let (name, pid_file) = (node.name.clone(), node.dir.join("pid"));
        let script = node.script.as_mut().expect("node was spawned");
        let what = format!("{name} to write its pid file");
        node.pid = Some(poll(&what, RABBIT_BOOT, || {
            script.check_running();
            fs::read_to_string(&pid_file).ok()?.trim().parse().ok()
        }));
        let ports = [Some(node.amqp_port), node.tls_port];
        let ports: Vec<u16> = ports.into_iter().flatten().collect();
        poll(
            &format!("{name} to listen on {ports:?}"),
            RABBIT_BOOT,
            || {
                script.check_running();
                ports.iter().all(|&p| port_open(p)).then_some(())
            },
        );
    }

    /// Joins nodes 1.. to node 0: `stop_app`, `join_cluster` (one at a time), `start_app`.
    fn join_all(&self) {
        let others: Vec<usize> = (1..self.nodes.len()).collect();
        self.on_each(&others, &["await_startup"]);
        self.on_each(&others, &["stop_app"]);
        for &i in &others {
            self.ctl(i, &["join_cluster", &self.nodes[0].name]);
        }
        self.on_each(&others, &["start_app"]);
    }

    /// Runs the same `rabbitmqctl` command against several nodes at once.
    fn on_each(&self, nodes: &[usize], args: &[&str]) {
        std::thread::scope(|scope| {
            for &i in nodes {
                scope.spawn(move || self.ctl(i, args));
            }
        });
    }

    /// Runs RabbitMQ CLI `tool` against node `i` (`-n node`): stdout, or `Err` with stderr.
    fn tool(&self, tool: &str, i: usize, args: &[&str]) -> Result<String, String> {
        let mut cmd = self.rabbit_cmd(tool);
        cmd.arg("-n").arg(&self.nodes[i].name).args(args);
        run_timeout(&mut cmd, CTL_TIMEOUT)
    }

    /// `rabbitmqctl -n <node i> ARGS…`: stdout or `Err` (status, stderr).
    pub fn try_ctl(&self, i: usize, args: &[&str]) -> Result<String, String> {
        self.tool("rabbitmqctl", i, args)
    }

    /// `rabbitmqctl -n <node i> ARGS…`: stdout; panics with stderr on failure.
    pub fn ctl(&self, i: usize, args: &[&str]) -> String {
        self.try_ctl(i, args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `rabbitmq-queues -n <node i> ARGS…`: stdout; panics with stderr on failure.
    pub fn queues(&self, i: usize, args: &[&str]) -> String {
        self.tool("rabbitmq-queues", i, args)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs `ctl` with `--formatter json` on the first running node and parses the output.
    fn ctl_json(&self, args: &[&str]) -> Option<Value> {
        let i = self.running().first().copied()?;
        let args: Vec<&str> = args
            .iter()
            .copied()
            .chain(["--formatter", "json"])
            .collect();
        serde_json::from_str(&self.try_ctl(i, &args).ok()?).ok()
    }

    /// The running nodes according to `cluster_status` asked of node `i`.
    pub fn try_running_nodes(&self, i: usize) -> Result<Vec<String>, String> {
        let out = self.try_ctl(i, &["cluster_status", "--formatter", "json"])?;
        let status: Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
        let names = status["running_nodes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        Ok(names
            .iter()
            .filter_map(|n| n.as_str().map(String::from))
            .collect())
    }

    /// The running nodes according to `cluster_status` asked of node `i`; panics on failure.
    pub fn running_nodes(&self, i: usize) -> Vec<String> {
        self.try_running_nodes(i).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Indexes of the nodes the harness has running (not killed).
    pub fn running(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].pid.is_some())
            .collect()
    }

    /// Waits until `cluster_status` (asked of a running node) shows every running node.
    pub fn wait_all_running(&self) {
        let up = self.running();
        let want: Vec<&str> = up.iter().map(|&i| self.nodes[i].name.as_str()).collect();
        poll(
            &format!("cluster_status to show {want:?} running"),
            RABBIT_BOOT,
            || {
                let running = self.try_running_nodes(*up.first()?).ok()?;
                want.iter()
                    .all(|w| running.iter().any(|r| r == w))
                    .then_some(())
            },
        );
    }

    /// Kills (-9) node `i`'s beam process and waits until it and its script are gone.
    pub fn kill(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let pid = node
            .pid
            .take()
            .unwrap_or_else(|| panic!("{} is down", node.name));
        kill9(pid);
        assert!(
            wait_gone(pid, Duration::from_secs(10)),
            "{} survived kill -9",
            node.name
        );
        if let Some(mut script) = node.script.take() {
            script.stop_after(Duration::from_secs(10));
        }
    }

    /// Starts killed node `i` again on its data dir and waits until it runs and
    /// `cluster_status` shows it (and every other running node) running.
    pub fn restart(&mut self, i: usize) {
        assert!(
            self.nodes[i].pid.is_none(),
            "{} is running",
            self.nodes[i].name
        );
        let started = Instant::now();
        self.spawn_node(i);
        self.wait_booted(i);
        self.wait_all_running();
        let name = &self.nodes[i].name;
        eprintln!("[servers] {name} restarted in {:.1?}", started.elapsed());
    }

    /// The index of the node named `name` (`lxt…-k@localhost`).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// The index of the node that leads quorum queue `queue` (vhost /), as
    /// `list_queues name leader` on a running node says; `None` if it can't tell.
    pub fn try_leader(&self, queue: &str) -> Option<usize> {
        let rows = self.ctl_json(&["list_queues", "name", "leader"])?;
        let row = rows.as_array()?.iter().find(|r| r["name"] == queue)?;
        self.index_of(row["leader"].as_str()?)
    }

    /// The index of the node that leads quorum queue `queue`; panics if none is known.
    pub fn leader(&self, queue: &str) -> usize {
        self.try_leader(queue)
            .unwrap_or_else(|| panic!("no leader known for queue {queue}"))
    }

    /// Waits until a running node other than `old` leads `queue`; its index.
    pub fn wait_new_leader(&self, queue: &str, old: usize, timeout: Duration) -> usize {
        poll(&format!("a new leader of {queue}"), timeout, || {
            let leader = self.try_leader(queue)?;
            (leader != old && self.nodes[leader].pid.is_some()).then_some(leader)
        })
    }

    /// For each client connection (by name), the index of the node it is on: asks every
    /// running node `list_connections name port` and maps the port to its node.
    pub fn connection_nodes(&self) -> Vec<usize> {
        let mut found = std::collections::BTreeMap::new();
        for i in self.running() {
            let out = self.ctl(
                i,
                &["list_connections", "name", "port", "--formatter", "json"],
            );
            let rows: Vec<Value> =
                serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
            for row in rows {
                let port = row["port"].as_u64().and_then(|p| u16::try_from(p).ok());
                let node = port.and_then(|p| self.index_of_port(p));
                found.insert(row["name"].to_string(), node.expect("a port of ours"));
            }
        }
        found.into_values().collect()
    }

    /// The index of the node listening on AMQP or TLS port `port`.
    fn index_of_port(&self, port: u16) -> Option<usize> {
        let listens = |n: &Node| n.amqp_port == port || n.tls_port == Some(port);
        self.nodes.iter().position(listens)
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f` for node `i`.
    pub fn amqp_url(&self, i: usize) -> String {
        format!(
            "amqp://guest:guest@127.0.0.1:{}/%2f",
            self.nodes[i].amqp_port
        )
    }

    /// `amqps://guest:guest@localhost:TLSPORT/%2f` for node `i` (cluster started with TLS).
    pub fn amqps_url(&self, i: usize) -> String {
        format!("amqps://guest:guest@localhost:{}/%2f", self.tls_port(i))
    }

    /// Node `i`'s name, `lxt<tag>-<i+1>@localhost`.
    pub fn node_name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// Node `i`'s AMQP port (127.0.0.1).
    pub fn amqp_port(&self, i: usize) -> u16 {
        self.nodes[i].amqp_port
    }

    /// Node `i`'s TLS AMQP port (127.0.0.1); panics if the cluster has no TLS.
    pub fn tls_port(&self, i: usize) -> u16 {
        self.nodes[i].tls_port.expect("cluster started without TLS")
    }

    /// Node `i`'s beam.smp OS pid, if it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].pid
    }

    /// Node `i`'s resident memory in KiB (VmRSS of beam.smp), if it runs.
    pub fn rss_kib(&self, i: usize) -> Option<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.nodes[i].pid?)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// The cluster's directory (removed on drop).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        let pids: Vec<u32> = self.nodes.iter_mut().filter_map(|n| n.pid.take()).collect();
        pids.iter().for_each(|&pid| kill9(pid));
        for node in &mut self.nodes {
            if let Some(mut script) = node.script.take() {
                script.stop_after(Duration::from_secs(10));
            }
        }
        self.epmd.take();
        cleanup(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------

/// `redis-cli -h 127.0.0.1 -p PORT ARGS…` (plain): trimmed stdout, or `Err` on failure.
pub fn redis_cli(port: u16, args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new("redis-cli");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args);
    run_timeout(&mut cmd, CLI_TIMEOUT).map(|out| out.trim().to_string())
}

/// A private redis-server on 127.0.0.1 that keeps nothing on disk (`--save ""
/// --appendonly no`), plain or TLS-only; runs as a child of the test (`--daemonize no`).
pub struct RedisServer {
    dir: PathBuf,
    port: u16,
    tls: bool,
    extra: Vec<String>,
    proc: Option<Daemon>,
}

impl RedisServer {
    /// A plain redis-server on a free port, with extra `args` (e.g. `--replicaof h p`).
    pub fn start(args: &[&str]) -> RedisServer {
        let extra = args.iter().map(|a| a.to_string()).collect();
        RedisServer::launch(extra, None)
    }

    /// A TLS-only redis-server (`--port 0 --tls-port N`) with `ca`'s server certificate;
    /// clients need no certificate (`--tls-auth-clients no`).
    pub fn tls(ca: &TestCa) -> RedisServer {
        RedisServer::launch(Vec::new(), Some(ca))
    }

    fn launch(extra: Vec<String>, ca: Option<&TestCa>) -> RedisServer {
        let started = Instant::now();
        let dir = private_dir("redis");
        if let Some(ca) = ca {
            ca.copy_server_files(&dir.join("tls"));
        }
        let (port, tls) = (free_port(), ca.is_some());
        let mut server = RedisServer {
            dir,
            port,
            tls,
            extra,
            proc: None,
        };
        server.spawn();
        let kind = if tls {
            "TLS redis-server"
        } else {
            "redis-server"
        };
        eprintln!(
            "[servers] {kind} on {port} started in {:.1?}",
            started.elapsed()
        );
        server
    }

    /// The listening arguments: `--port N`, or `--port 0 --tls-port N --tls-…`.
    fn listen_args(&self) -> Vec<String> {
        let port = self.port.to_string();
        if !self.tls {
            return vec!["--port".into(), port];
        }
        let tls = |file: &str| self.dir.join("tls").join(file).display().to_string();
        [
            ("--port", "0".to_string()),
            ("--tls-port", port),
            ("--tls-cert-file", tls("server.pem")),
            ("--tls-key-file", tls("server.key")),
            ("--tls-ca-cert-file", tls("ca.pem")),
            ("--tls-auth-clients", "no".to_string()),
        ]
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_string(), value])
        .collect()
    }

    /// Starts redis-server and waits until it answers PING.
    fn spawn(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.current_dir(&self.dir)
            .args(self.listen_args())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--repl-diskless-sync-delay", "0"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--pidfile")
            .arg(self.dir.join("redis.pid"))
            .args(&self.extra);
        let name = format!("redis-server on {}", self.port);
        let mut proc = Daemon::spawn(&mut cmd, &self.dir.join("redis.log"), &name);
        poll(&format!("{name} to answer PING"), REDIS_BOOT, || {
            proc.check_running();
            (self.cli(&["ping"]).ok()? == "PONG").then_some(())
        });
        self.proc = Some(proc);
    }

    /// `redis-cli` against this server (with `--tls --cacert` for a TLS one).
    pub fn cli(&self, args: &[&str]) -> Result<String, String> {
        if !self.tls {
            return redis_cli(self.port, args);
        }
        let ca = self.dir.join("tls/ca.pem").display().to_string();
        let tls_args = ["--tls", "--cacert", &ca]
            .into_iter()
            .chain(args.iter().copied());
        redis_cli(self.port, &tls_args.collect::<Vec<_>>())
    }

    /// The plain port; panics for a TLS-only server.
    pub fn port(&self) -> u16 {
        assert!(!self.tls, "TLS-only redis-server: use tls_port()");
        self.port
    }

    /// The TLS port; panics for a plain server.
    pub fn tls_port(&self) -> u16 {
        assert!(self.tls, "plain redis-server: use port()");
        self.port
    }

    /// `redis://127.0.0.1:PORT` or, for TLS, `rediss://localhost:PORT`.
    pub fn url(&self) -> String {
        match self.tls {
            false => format!("redis://127.0.0.1:{}", self.port),
            true => format!("rediss://localhost:{}", self.port),
        }
    }

    /// The server's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Daemon::pid)
    }

    /// Whether the server runs (was not killed).
    pub fn is_running(&self) -> bool {
        self.proc.is_some()
    }

    /// kill -9 and wait for the process.
    pub fn kill(&mut self) {
        self.proc.take();
    }

    /// Kills it if it runs and starts it again on the same port and arguments: empty.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The server's directory (removed on drop).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.proc.take();
        cleanup(&self.dir);
    }
}

/// A Redis master, one replica and three sentinels (`sentinel monitor <name> 127.0.0.1
/// <master> 2`, `down-after-milliseconds 1000`, `failover-timeout 5000`).
pub struct Sentinels {
    dir: PathBuf,
    name: String,
    /// [0] the first master, [1] its replica.
    servers: Vec<RedisServer>,
    /// (port, process) of each sentinel.
    sentinels: Vec<(u16, Daemon)>,
}

impl Sentinels {
    /// Starts them and waits until every sentinel knows the master, the replica and the
    /// two other sentinels.
    pub fn start() -> Sentinels {
        let started = Instant::now();
        let master = RedisServer::start(&[]);
        let master_port = master.port().to_string();
        let replica = RedisServer::start(&["--replicaof", "127.0.0.1", &master_port]);
        poll("the replica to sync", REDIS_BOOT, || {
            let info = replica.cli(&["info", "replication"]).ok()?;
            info.contains("master_link_status:up").then_some(())
        });
        let mut group = Sentinels {
            dir: private_dir("sentinel"),
            name: format!("lxt{}", tag()),
            servers: vec![master, replica],
            sentinels: Vec::new(),
        };
        (0..3).for_each(|k| group.spawn_sentinel(k));
        group.wait_agreed();
        let name = &group.name;
        eprintln!(
            "[servers] sentinels for {name} agreed in {:.1?}",
            started.elapsed()
        );
        group
    }

    /// Writes sentinel `k`'s conf (in its own, writable dir) and starts it.
    fn spawn_sentinel(&mut self, k: usize) {
        let (port, dir) = (free_port(), self.dir.join(format!("sentinel-{k}")));
        fs::create_dir_all(&dir).unwrap();
        let (name, master) = (&self.name, self.servers[0].port());
        let conf = format!(
            "port {port}\nbind 127.0.0.1\ndaemonize no\ndir \"{}\"\n\
             sentinel resolve-hostnames no\n\
             sentinel monitor {name} 127.0.0.1 {master} 2\n\
             sentinel down-after-milliseconds {name} 1000\n\
             sentinel failover-timeout {name} 5000\n",
            dir.display()
        );
        fs::write(dir.join("sentinel.conf"), conf).unwrap();
        let mut cmd = Command::new("redis-server");
        cmd.current_dir(&dir)
            .arg(dir.join("sentinel.conf"))
            .arg("--sentinel");
        let log = dir.join("sentinel.log");
        let proc = Daemon::spawn(&mut cmd, &log, &format!("sentinel on {port}"));
        self.sentinels.push((port, proc));
    }

    /// Waits until each sentinel reports num-slaves=1 and num-other-sentinels=2.
    fn wait_agreed(&mut self) {
        let name = self.name.clone();
        for (port, proc) in &mut self.sentinels {
            let what = format!("sentinel {port} to know 1 replica and 2 sentinels");
            poll(&what, Duration::from_secs(60), || {
                proc.check_running();
                let reply = redis_cli(*port, &["SENTINEL", "master", &name]).ok()?;
                let lines: Vec<&str> = reply.lines().map(str::trim).collect();
                let fields: HashMap<&str, &str> = lines
                    .chunks(2)
                    .filter_map(|c| Some((c[0], *c.get(1)?)))
                    .collect();
                let ok = fields.get("num-slaves") == Some(&"1")
                    && fields.get("num-other-sentinels") == Some(&"2");
                ok.then_some(())
            });
        }
    }

    /// The name the sentinels monitor the master under.
    pub fn master_name(&self) -> &str {
        &self.name
    }

    /// `redis://127.0.0.1:P` for each sentinel.
    pub fn sentinel_urls(&self) -> Vec<String> {
        let ports = self.sentinels.iter().map(|(p, _)| p);
        ports.map(|p| format!("redis://127.0.0.1:{p}")).collect()
    }

    /// The sentinels' ports.
    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(|(p, _)| *p).collect()
    }

    /// The ports of the first master and of the replica.
    pub fn server_ports(&self) -> Vec<u16> {
        self.servers.iter().map(|s| s.port).collect()
    }

    /// What sentinel `port` names as the master's port.
    fn asked_master(&self, port: u16) -> Option<u16> {
        let reply = redis_cli(port, &["SENTINEL", "get-master-addr-by-name", &self.name]).ok()?;
        reply.lines().nth(1)?.trim().parse().ok()
    }

    /// The master's port, as the first sentinel that answers says.
    pub fn master_port(&self) -> u16 {
        let ports = self.sentinel_ports();
        let port = ports.iter().find_map(|&p| self.asked_master(p));
        port.expect("no sentinel names a master")
    }

    /// kill -9 of the current master's process; its port.
    pub fn kill_master(&mut self) -> u16 {
        let port = self.master_port();
        let server = self
            .servers
            .iter_mut()
            .find(|s| s.port == port && s.is_running());
        server.expect("the master is one of ours and runs").kill();
        port
    }

    /// Polls until every sentinel names a master other than `old_port`; the new port.
    pub fn wait_failover(&self, old_port: u16, timeout: Duration) -> u16 {
        let ports = self.sentinel_ports();
        poll(&format!("a failover away from {old_port}"), timeout, || {
            let named: Vec<Option<u16>> = ports.iter().map(|&p| self.asked_master(p)).collect();
            let first = named[0]?;
            (first != old_port && named.iter().all(|p| *p == Some(first))).then_some(first)
        })
    }

    /// The directory of the sentinels (removed on drop; the servers have their own).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        self.sentinels.clear();
        self.servers.clear();
        cleanup(&self.dir);
    }
}
