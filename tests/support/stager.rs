//! A real stager for tests: its own home under a scratch directory, a free port on
//! 127.0.0.1, a rescue and a target bundle, enrolled hosts and an operator, and PEM files
//! for `curl`. The server process is killed on drop.

use crate::{ok, reinstall, stager};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub struct Stager {
    pub dir: PathBuf,
    pub home: PathBuf,
    pub port: u16,
    child: Option<Child>,
}

/// PEM files cut out of an identity file, for curl.
pub struct Pems {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Stager {
    /// Initializes a home with bundles `rescue@1` (from `rescue_src`) and `target@1`, hosts
    /// `web1`, `web2`, operator `alice`; does not start serving.
    pub fn new(dir: &Path, target_src: &Path) -> Stager {
        let tiny = dir.join("tiny-rescue");
        std::fs::create_dir_all(tiny.join("etc")).unwrap();
        std::fs::write(tiny.join("etc/hostname"), "rescue\n").unwrap();
        Self::with_rescue(dir, &tiny, target_src)
    }

    /// As [`Stager::new`], with the rescue bundle built from `rescue_src`.
    pub fn with_rescue(dir: &Path, rescue_src: &Path, target_src: &Path) -> Stager {
        Self::with_bundles(dir, rescue_src, target_src, &["--os", "linux"])
    }

    /// As [`with_rescue`](Self::with_rescue), the target built with `target_args` (its
    /// `--os` and what goes with it).
    pub fn with_bundles(
        dir: &Path,
        rescue_src: &Path,
        target_src: &Path,
        target_args: &[&str],
    ) -> Stager {
        let home = dir.join("home");
        let port = free_port();
        ok(stager()
            .arg("init")
            .arg("--dir")
            .arg(&home)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--default-rescue", "rescue"]));
        for (name, kind, src, args) in [
            ("rescue", "rescue", rescue_src, &["--os", "linux"][..]),
            ("target", "target", target_src, target_args),
        ] {
            ok(stager()
                .args(["bundle", "build", "--dir"])
                .arg(&home)
                .args(["--name", name, "--version", "1", "--kind", kind])
                .args(args)
                .arg(src));
        }
        let s = Stager {
            dir: dir.to_path_buf(),
            home,
            port,
            child: None,
        };
        for h in ["web1", "web2"] {
            s.enroll(h);
        }
        s.operator("alice", 365);
        s
    }

    pub fn enroll(&self, host: &str) -> PathBuf {
        let out = self.identity(host);
        ok(stager()
            .arg("enroll")
            .arg("--dir")
            .arg(&self.home)
            .arg(host)
            .arg("--out")
            .arg(&out));
        out
    }

    /// Enrolls `host` in `site` (a host enrolled already moves there, and its identity file
    /// is replaced by the new one).
    pub fn enroll_in(&self, host: &str, site: &str) -> PathBuf {
        let out = self.identity(host);
        let _ = std::fs::remove_file(&out);
        ok(stager()
            .args(["enroll", "--dir"])
            .arg(&self.home)
            .args([host, "--site", site, "--out"])
            .arg(&out));
        out
    }

    pub fn operator(&self, name: &str, days: i64) -> PathBuf {
        let out = self.identity(name);
        ok(stager()
            .arg("operator")
            .arg("--dir")
            .arg(&self.home)
            .arg(name)
            .arg("--out")
            .arg(&out)
            .arg(format!("--days={days}")));
        out
    }

    pub fn identity(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.toml"))
    }

    /// Starts `stager serve` and waits until it listens.
    pub fn start(&mut self) {
        self.child = Some(listening(
            stager().arg("serve").arg("--dir").arg(&self.home),
        ));
    }

    /// SIGKILL, no shutdown.
    pub fn kill(&mut self) {
        stop(&mut self.child);
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    /// The certificate, key and CA of an identity file, as PEM files for curl.
    pub fn pems(&self, name: &str) -> Pems {
        let text = std::fs::read_to_string(self.identity(name)).unwrap();
        let id = proto::identity::IdentityFile::parse(Path::new(name), &text).unwrap();
        let p = |ext: &str, body: &str| {
            let f = self.dir.join(format!("{name}.{ext}"));
            std::fs::write(&f, body).unwrap();
            f
        };
        Pems {
            cert: p("crt", &id.cert),
            key: p("key", &id.key),
            ca: p("ca", &id.ca),
        }
    }

    /// curl as `name` (`None`: without a client certificate). Returns (HTTP status, body);
    /// status 0 if the TLS handshake or connection failed.
    pub fn curl(&self, name: Option<&str>, args: &[&str], path: &str) -> (u16, String) {
        self.curl_at(&self.url(path), name, args)
    }

    /// As [`curl`](Self::curl), to any URL (a site relay's) with this stager's identities.
    pub fn curl_at(&self, url: &str, name: Option<&str>, args: &[&str]) -> (u16, String) {
        let pems = self.pems(name.unwrap_or("alice"));
        let mut c = Command::new("curl");
        c.args([
            "-sS",
            "--max-time",
            "30",
            "-w",
            "\n%{http_code}",
            "--cacert",
        ])
        .arg(&pems.ca);
        if !args.contains(&"-o") {
            c.args(["-o", "-"]);
        }
        if name.is_some() {
            c.arg("--cert").arg(&pems.cert).arg("--key").arg(&pems.key);
        }
        let out = c.args(args).arg(url).output().expect("running curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// `reinstall --identity NAME.toml ARGS...`
    pub fn reinstall(&self, name: &str) -> Command {
        let mut c = reinstall();
        c.arg("--identity").arg(self.identity(name));
        c
    }

    /// Where the stager stores blob `sha`.
    pub fn blob_path(&self, sha: &str) -> PathBuf {
        self.home.join("blobs/sha256").join(sha)
    }

    pub fn blob_len(&self, sha: &str) -> u64 {
        std::fs::metadata(self.blob_path(sha)).unwrap().len()
    }

    pub fn sha_of(&self, bundle: &str) -> String {
        let m: serde_json::Value = serde_json::from_slice(
            &std::fs::read(self.home.join(format!("bundles/{bundle}/1/manifest.json"))).unwrap(),
        )
        .unwrap();
        m["payload"]["sha256"].as_str().unwrap().to_string()
    }
}

impl Drop for Stager {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Stager {
    /// Sets `key = value` (TOML) in stager.toml; takes effect at the next start.
    pub fn set_config(&self, key: &str, value: &str) {
        set_toml(&self.home.join("stager.toml"), key, value);
    }
}

/// A site relay of a test stager (`stager relay init` + `stager relay serve`) on a free port
/// of 127.0.0.1; killed on drop.
pub struct Relay {
    pub dir: PathBuf,
    pub port: u16,
    child: Option<Child>,
}

impl Relay {
    pub fn init(s: &Stager, name: &str) -> Relay {
        Self::init_with(s, name, &[])
    }

    /// As [`init`](Self::init), with more `stager relay init` arguments (`--site`,
    /// `--upstream`).
    pub fn init_with(s: &Stager, name: &str, args: &[&str]) -> Relay {
        let dir = s.dir.join(format!("relay-{name}"));
        let port = free_port();
        ok(stager()
            .args(["relay", "init", "--dir"])
            .arg(&s.home)
            .args(["--name", name, "--san", "127.0.0.1"])
            .args(["--listen", &format!("127.0.0.1:{port}"), "--out"])
            .arg(&dir)
            .args(args));
        Relay {
            dir,
            port,
            child: None,
        }
    }

    /// Starts `stager relay serve` and waits until it listens.
    pub fn start(&mut self) {
        self.child = Some(listening(
            stager().args(["relay", "serve", "--dir"]).arg(&self.dir),
        ));
    }

    pub fn kill(&mut self) {
        stop(&mut self.child);
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    /// Sets `key = value` (TOML) in relay.toml; takes effect at the next start.
    pub fn set(&self, key: &str, value: &str) {
        set_toml(&self.dir.join("relay.toml"), key, value);
    }
}

/// Sets the top-level `key = value` in the TOML file `p` (after its first line, a comment,
/// before any table), replacing the key's line if it has one.
fn set_toml(p: &Path, key: &str, value: &str) {
    let text = std::fs::read_to_string(p).unwrap();
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with(&format!("{key} =")))
        .map(String::from)
        .collect();
    lines.insert(1, format!("{key} = {value}"));
    std::fs::write(p, lines.join("\n") + "\n").unwrap();
}

/// A TCP proxy on 127.0.0.1 (a WAN link, as a relay sees it) to `127.0.0.1:to`. The first
/// connection to carry more than `after` bytes towards the client is, once, either cut
/// ([`WanProxy::cutting`]) or held there until [`WanProxy::release`] ([`WanProxy::holding`]).
pub struct WanProxy {
    pub port: u16,
    /// 0 until the connection reached `after` bytes, then 1.
    hit: std::sync::Arc<std::sync::atomic::AtomicU32>,
    released: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl WanProxy {
    pub fn cutting(to: u16, after: u64) -> WanProxy {
        WanProxy::start(to, after, true)
    }

    pub fn holding(to: u16, after: u64) -> WanProxy {
        WanProxy::start(to, after, false)
    }

    fn start(to: u16, after: u64, cut: bool) -> WanProxy {
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let hit = Arc::new(AtomicU32::new(0));
        let released = Arc::new(AtomicBool::new(false));
        let (counted, release) = (hit.clone(), released.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", to)) else {
                    continue;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                // Towards the server, as it comes.
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut &c2, &mut &s2);
                    let _ = s2.shutdown(Shutdown::Write);
                });
                let (hit, release) = (counted.clone(), release.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut sent = 0u64;
                    loop {
                        let n = match std::io::Read::read(&mut &server, &mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        sent += n as u64;
                        if sent > after
                            && hit
                                .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst)
                                .is_ok()
                        {
                            if cut {
                                let _ = client.shutdown(Shutdown::Both);
                                let _ = server.shutdown(Shutdown::Both);
                                return;
                            }
                            while !release.load(Ordering::SeqCst) {
                                std::thread::sleep(std::time::Duration::from_millis(10));
                            }
                        }
                        if std::io::Write::write_all(&mut &client, &buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = client.shutdown(Shutdown::Write);
                });
            }
        });
        WanProxy {
            port,
            hit,
            released,
        }
    }

    /// Connections cut, or held, so far (0 or 1).
    pub fn hits(&self) -> u32 {
        self.hit.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Lets a held connection go on.
    pub fn release(&self) {
        self.released
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A TCP proxy on 127.0.0.1 to `127.0.0.1:to` whose link goes silent, as a pulled cable or a
/// network partition makes it: nothing more passes, either way, on any connection open then
/// (no FIN, no RST: a peer hears nothing, and those connections stay so), and new connections
/// are closed at once, for `for_`; after that new connections pass again. It goes silent at
/// the first of: more than `after` bytes gone towards the clients; a client sending on a
/// connection that has answered and then been quiet for 300 ms (a kept-alive connection
/// used again: that request is the one lost).
pub struct Partition {
    pub port: u16,
    /// When the link went silent, once it has.
    cut_at: std::sync::Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

impl Partition {
    pub fn start(to: u16, after: u64, for_: std::time::Duration) -> Partition {
        use std::net::{TcpListener, TcpStream};
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::{Arc, Mutex};
        use std::time::Instant;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
        let sent = Arc::new(AtomicU64::new(0));
        let state = cut_at.clone();
        // Whether a connection accepted at `born` may carry data now.
        let passes = move |born: Instant| match *state.lock().unwrap() {
            None => true,
            Some(t) => born > t && t.elapsed() >= for_,
        };
        let cut = cut_at.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let born = Instant::now();
                if !passes(born) {
                    continue; // dropped: closed at once
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", to)) else {
                    continue;
                };
                // When this connection last carried data towards the client, if it has.
                let answered: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
                for (from, into, counted) in [
                    (
                        client.try_clone().unwrap(),
                        server.try_clone().unwrap(),
                        false,
                    ),
                    (server, client, true),
                ] {
                    let (passes, sent, cut) = (passes.clone(), sent.clone(), cut.clone());
                    let answered = answered.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 16 * 1024];
                        // Reads on after the cut (what comes is dropped); an end passes on
                        // only while the link passes: after the cut neither peer hears one.
                        while let Ok(n @ 1..) = std::io::Read::read(&mut &from, &mut buf) {
                            let mut last = answered.lock().unwrap();
                            let reused = !counted
                                && last.is_some_and(|t| {
                                    t.elapsed() >= std::time::Duration::from_millis(300)
                                });
                            if counted {
                                *last = Some(Instant::now());
                            }
                            drop(last);
                            if reused
                                || counted
                                    && sent.fetch_add(n as u64, Ordering::SeqCst) + n as u64 > after
                            {
                                cut.lock().unwrap().get_or_insert_with(Instant::now);
                            }
                            if passes(born)
                                && std::io::Write::write_all(&mut &into, &buf[..n]).is_err()
                            {
                                break;
                            }
                        }
                        if passes(born) {
                            let _ = into.shutdown(std::net::Shutdown::Write);
                        }
                    });
                }
            }
        });
        Partition { port, cut_at }
    }

    /// When the link went silent, if it has.
    pub fn cut_at(&self) -> Option<std::time::Instant> {
        *self.cut_at.lock().unwrap()
    }
}

/// Starts a server and waits for its first line, which must say it is listening; what it
/// says afterwards (progress lines) is read and dropped, so it never writes to a closed pipe.
fn listening(cmd: &mut Command) -> Child {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let mut line = String::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    out.read_line(&mut line).unwrap();
    assert!(line.contains("listening"), "{cmd:?} said {line:?}");
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    child
}

/// SIGKILL, no shutdown, and reaped.
fn stop(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
    }
}
