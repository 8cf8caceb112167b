//! A real stager on 127.0.0.1 with real mutual TLS, driven by `curl` (a client nobody here
//! wrote) and by `reinstall`: every authorization rule, allowed and refused; bad input;
//! long polls; Range resume; and durability across SIGKILL.

use integration_tests::stager::Stager;
use integration_tests::*;
use std::time::{Duration, Instant};

fn small_target(dir: &std::path::Path) -> std::path::PathBuf {
    let t = dir.join("target-tree");
    std::fs::create_dir_all(t.join("etc")).unwrap();
    std::fs::write(t.join("etc/marker"), "target\n").unwrap();
    t
}

fn started(w: &tempfile::TempDir) -> Stager {
    let mut s = Stager::new(w.path(), &small_target(w.path()));
    s.start();
    s
}

fn create_job(s: &Stager, host: &str) -> u64 {
    let (code, body) = post_job(s, &format!(r#"{{"hosts":["{host}"],"target":"target"}}"#));
    assert_eq!(code, 201, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["id"].as_u64().unwrap()
}

/// Host `name` as `GET /v1/hosts` lists it (operator alice).
fn host_record(s: &Stager, name: &str) -> serde_json::Value {
    let (code, body) = s.curl(Some("alice"), &[], "/v1/hosts");
    assert_eq!(code, 200, "{body}");
    let hosts: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    hosts
        .into_iter()
        .find(|h| h["name"] == name)
        .unwrap_or_else(|| panic!("no host {name} in {body}"))
}

/// `POST /v1/jobs` as operator alice with a JSON body.
fn post_job(s: &Stager, body: &str) -> (u16, String) {
    s.curl(
        Some("alice"),
        &["-H", "content-type: application/json", "-d", body],
        "/v1/jobs",
    )
}

fn post_event(s: &Stager, host: &str, body: &str) -> (u16, String) {
    s.curl(
        Some(host),
        &["-H", "content-type: application/json", "-d", body],
        "/v1/agent/events",
    )
}

#[test]
fn curl_creates_a_job_and_fetches_a_blob_over_http1_and_http2() {
    let w = scratch();
    let s = started(&w);
    let id = create_job(&s, "web1");
    let sha = s.sha_of("target");
    for proto in ["--http1.1", "--http2"] {
        let out = s.dir.join(format!("blob{proto}"));
        let (code, _) = s.curl(
            Some("web1"),
            &[proto, "-o", out.to_str().unwrap()],
            &format!("/v1/blobs/{sha}"),
        );
        assert_eq!(code, 200);
        let got = sh(&format!("sha256sum {} | cut -d' ' -f1", out.display()));
        assert_eq!(got.trim(), sha, "{proto}");
    }
    // Fetching its job's blob is taking the job: the host is running it.
    let (code, body) = s.curl(Some("alice"), &[], &format!("/v1/jobs/{id}"));
    assert_eq!(code, 200);
    assert!(body.contains("\"state\": \"running\""), "{body}");
}

#[test]
fn every_authorization_rule_is_enforced_from_the_certificate() {
    let w = scratch();
    let s = started(&w);
    create_job(&s, "web1");
    let (tsha, rsha) = (s.sha_of("target"), s.sha_of("rescue"));
    let allowed: &[(&str, &str)] = &[
        ("web1", "/v1/agent/work"),
        ("web1", "/v1/bundles/target/1/manifest"),
        ("web1", "/v1/bundles/target/1/signature"),
        ("web1", "/v1/bundles/target/1/identity"),
        ("web1", "/v1/bundles/rescue/1/identity"),
        ("web2", "/v1/agent/work"),
        ("alice", "/v1/jobs"),
        ("alice", "/v1/hosts"),
        ("alice", "/metrics"),
        ("alice", "/v1/bundles/target/1/manifest"),
        ("alice", "/v1/bundles/target"),
        ("web1", "/healthz"),
    ];
    for (who, path) in allowed {
        let (code, body) = s.curl(Some(who), &[], path);
        assert_eq!(code, 200, "{who} GET {path}: {body}");
    }
    for (who, sha) in [("web1", &tsha), ("web1", &rsha), ("alice", &tsha)] {
        let (code, _) = s.curl(Some(who), &["-o", "/dev/null"], &format!("/v1/blobs/{sha}"));
        assert_eq!(code, 200, "{who} blob");
    }
    let refused: &[(&str, &str, &str)] = &[
        // Another host's job, bundles and keys.
        ("web2", "/v1/bundles/target/1/identity", "no unfinished job"),
        ("web2", &format!("/v1/blobs/{tsha}"), "no unfinished job"),
        // Agents on operator routes.
        ("web1", "/v1/jobs", "operator route"),
        ("web1", "/v1/hosts", "operator route"),
        ("web1", "/metrics", "operator route"),
        ("web1", "/v1/bundles/target", "operator route"),
        // Operators never get a bundle's age identity, nor agent routes.
        (
            "alice",
            "/v1/bundles/target/1/identity",
            "released only to agents",
        ),
        ("alice", "/v1/agent/work", "agent route"),
    ];
    for (who, path, why) in refused {
        let (code, body) = s.curl(Some(who), &[], path);
        assert_eq!(code, 403, "{who} GET {path}: {body}");
        assert!(body.contains(why), "{who} GET {path}: {body}");
    }
    let (code, body) = s.curl(
        Some("web1"),
        &[
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"hosts":["web1"],"target":"target"}"#,
        ],
        "/v1/jobs",
    );
    assert_eq!(code, 403, "{body}");
    // web1 reporting on a job that is not its own.
    let (code, body) = post_event(&s, "web2", r#"{"job":1,"kind":"progress"}"#);
    assert_eq!(code, 404, "{body}");
}

#[test]
fn no_certificate_another_ca_expired_and_revoked_are_refused() {
    let w = scratch();
    let s = started(&w);
    // No client certificate: the handshake fails.
    let (code, _) = s.curl(None, &[], "/healthz");
    assert_eq!(code, 0);
    // A certificate from another stager's CA.
    let other = scratch();
    let o = Stager::new(other.path(), &small_target(other.path()));
    let p = o.pems("alice");
    let out = run(std::process::Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(s.pems("alice").ca)
        .arg("--cert")
        .arg(&p.cert)
        .arg("--key")
        .arg(&p.key)
        .arg(s.url("/healthz")));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "000",
        "another CA's certificate was accepted"
    );
    // Expired.
    s.operator("old", -1);
    let (code, _) = s.curl(Some("old"), &[], "/healthz");
    assert_eq!(code, 0, "an expired certificate was accepted");
    // Revoked while the server runs: refused from the next request on.
    s.operator("bob", 30);
    let (code, _) = s.curl(Some("bob"), &[], "/v1/jobs");
    assert_eq!(code, 200);
    ok(stager().arg("revoke").arg("--dir").arg(&s.home).arg("bob"));
    let t = Instant::now();
    let (code, body) = s.curl(Some("bob"), &[], "/v1/jobs");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("revoked"), "{body}");
    assert!(t.elapsed() < Duration::from_secs(5));
    let (_, metrics) = s.curl(Some("alice"), &[], "/metrics");
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("stager_handshakes_refused_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(refused >= 3, "{metrics}");
    assert!(
        metrics.contains("stager_revoked_refused_total 1"),
        "{metrics}"
    );
}

#[test]
fn bad_input_gets_a_json_4xx_naming_the_problem_and_the_server_keeps_serving() {
    let w = scratch();
    let s = started(&w);
    let json = |body: &str| {
        vec![
            "-H".to_string(),
            "content-type: application/json".into(),
            "-d".into(),
            body.to_string(),
        ]
    };
    let big = format!(r#"{{"hosts":["{}"],"target":"t"}}"#, "x".repeat(100_000));
    let cases: Vec<(Vec<String>, &str, u16, &str)> = vec![
        (json("{not json"), "/v1/jobs", 400, "request body"),
        (
            json(r#"{"hosts":["web1"],"target":"target","force":true}"#),
            "/v1/jobs",
            400,
            "unknown field `force`",
        ),
        (json(&big), "/v1/jobs", 413, "over 65536 bytes"),
        (
            json(r#"{"hosts":["nosuch","web1","other"],"target":"target"}"#),
            "/v1/jobs",
            404,
            // Every unknown host named at once.
            "hosts are not enrolled (stager enroll HOST): \"nosuch\", \"other\"",
        ),
        (
            json(r#"{"hosts":["web1"],"target":"nosuch"}"#),
            "/v1/jobs",
            404,
            "no bundle named nosuch",
        ),
        (
            json(r#"{"hosts":["web1"],"target":"rescue"}"#),
            "/v1/jobs",
            400,
            "not Target",
        ),
        (
            json(r#"{"hosts":[],"target":"target"}"#),
            "/v1/jobs",
            400,
            "hosts is empty",
        ),
        (
            vec![],
            "/v1/blobs/..%2F..%2Fetc%2Fpasswd",
            400,
            "is not a SHA-256",
        ),
        (
            vec![],
            "/v1/blobs/0000000000000000000000000000000000000000000000000000000000000000",
            404,
            "no blob",
        ),
        (
            vec![],
            "/v1/bundles/..%2F..%2Fetc/1/manifest",
            400,
            "bundle name",
        ),
        (vec![], "/v1/jobs/abc", 400, "not a number"),
        (vec![], "/v1/jobs/999", 404, "no job 999"),
        (vec![], "/v1/nothing", 404, "no route"),
    ];
    for (args, path, want, why) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, body) = s.curl(Some("alice"), &args, path);
        assert_eq!(code, *want, "{path} {args:?}: {body}");
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}"));
        let msg = v["error"].as_str().unwrap();
        assert!(msg.contains(why), "{path}: {msg:?} should mention {why:?}");
    }
    // An unsatisfiable range and a malformed one on a real blob.
    let sha = s.sha_of("target");
    for r in ["999999999-", "5-1"] {
        let (code, body) = s.curl(Some("alice"), &["-r", r], &format!("/v1/blobs/{sha}"));
        assert_eq!(code, 416, "{r}: {body}");
    }
    // A second job for a busy host is a conflict that names the job.
    create_job(&s, "web1");
    let (code, body) = s.curl(
        Some("alice"),
        &json(r#"{"hosts":["web1"],"target":"target"}"#)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        "/v1/jobs",
    );
    assert_eq!(code, 409, "{body}");
    let err: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        err["error"],
        "host already has an unfinished job; cancel it first: \"web1\" (job 1)"
    );
    let (code, _) = s.curl(Some("alice"), &[], "/healthz");
    assert_eq!(code, 200, "the server stopped serving after bad input");
}

#[test]
fn a_long_poll_answers_as_soon_as_a_job_appears() {
    let w = scratch();
    let s = started(&w);
    let p = s.pems("web1");
    let t = Instant::now();
    let poll = std::process::Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(&p.ca)
        .arg("--cert")
        .arg(&p.cert)
        .arg("--key")
        .arg(&p.key)
        .arg(s.url("/v1/agent/work?wait=30"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let id = create_job(&s, "web1");
    let out = poll.wait_with_output().unwrap();
    let elapsed = t.elapsed();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["job"]["id"].as_u64(), Some(id));
    assert!(
        elapsed < Duration::from_secs(10),
        "the long poll took {elapsed:?}"
    );
    // With nothing to do, it answers after the wait.
    let t = Instant::now();
    let (code, body) = s.curl(Some("web2"), &[], "/v1/agent/work?wait=2");
    assert_eq!(code, 200);
    assert!(body.contains("\"job\": null"), "{body}");
    assert!(t.elapsed() >= Duration::from_secs(2));
}

#[test]
fn a_range_download_cut_midway_resumes_to_the_right_hash() {
    let w = scratch();
    // Incompressible data, so the blob is big enough to cut.
    let tree = w.path().join("big");
    std::fs::create_dir_all(&tree).unwrap();
    sh(&format!(
        "head -c 30000000 /dev/urandom > {}/random.bin",
        tree.display()
    ));
    let mut s = Stager::new(w.path(), &tree);
    s.start();
    create_job(&s, "web1");
    let sha = s.sha_of("target");
    let p = s.pems("web1");
    let part = w.path().join("blob.part");
    let curl = |extra: &[&str]| {
        let mut c = std::process::Command::new("curl");
        c.args(["-sS", "--cacert"])
            .arg(&p.ca)
            .arg("--cert")
            .arg(&p.cert)
            .arg("--key")
            .arg(&p.key)
            .args(extra)
            .arg("-o")
            .arg(&part)
            .arg(s.url(&format!("/v1/blobs/{sha}")));
        c
    };
    // Throttled, and cut after a second.
    let mut cut = curl(&["--limit-rate", "4M"]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    cut.kill().unwrap();
    cut.wait().unwrap();
    let got = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    let total = s.blob_len(&sha);
    assert!(got > 0 && got < total, "cut at {got} of {total}");
    // Resume where it stopped (curl sends Range: bytes=GOT-).
    ok(&mut curl(&["-C", "-"]));
    let h = sh(&format!("sha256sum {} | cut -d' ' -f1", part.display()));
    assert_eq!(h.trim(), sha);
    let (_, metrics) = s.curl(Some("alice"), &[], "/metrics");
    assert!(
        metrics.contains("route=\"GET /v1/blobs/:id\",status=\"206\""),
        "{metrics}"
    );
    s.kill();
}

#[test]
fn sigkill_of_the_stager_loses_no_acknowledged_job_or_event() {
    let w = scratch();
    let mut s = started(&w);
    let id = create_job(&s, "web1");
    let mut last = 0;
    for i in 1..=25u64 {
        let body = format!(
            r#"{{"job":{id},"kind":"progress","phase":"stage-rescue","bytes_done":{},"bytes_total":1000000}}"#,
            i * 1000
        );
        let (code, b) = post_event(&s, "web1", &body);
        assert_eq!(code, 200, "{b}");
        last = i * 1000;
    }
    // Acknowledged: now kill without warning, and come back.
    s.kill();
    s.start();
    let (code, body) = s.curl(Some("alice"), &[], &format!("/v1/jobs/{id}"));
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["hosts"][0]["bytes_done"].as_u64(), Some(last), "{body}");
    assert_eq!(v["hosts"][0]["phase"], "stage-rescue");
    // And it carries on: the job completes.
    let (code, _) = post_event(
        &s,
        "web1",
        &format!(r#"{{"job":{id},"kind":"done","phase":"target-up"}}"#),
    );
    assert_eq!(code, 200);
    let (_, body) = s.curl(Some("alice"), &[], &format!("/v1/jobs/{id}"));
    assert!(body.contains("\"state\": \"done\""), "{body}");
}

#[test]
fn reinstall_wait_follows_the_job_and_exits_by_its_outcome() {
    let w = scratch();
    let s = started(&w);
    for (host, outcome, want_ok) in [("web1", "done", true), ("web2", "failed", false)] {
        let mut c = s.reinstall("alice");
        c.args(["--host", host, "--target", "target", "--wait", "--json"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let child = c.spawn().unwrap();
        // Wait for the job to exist, then play the agent.
        let id = (0..50)
            .find_map(|_| {
                std::thread::sleep(Duration::from_millis(200));
                let (_, body) = s.curl(Some(host), &[], "/v1/agent/work");
                let v: serde_json::Value = serde_json::from_str(&body).ok()?;
                v["job"]["id"].as_u64()
            })
            .expect("the job never appeared");
        for ev in [
            format!(r#"{{"job":{id},"kind":"phase_entered","phase":"stage-rescue"}}"#),
            format!(r#"{{"job":{id},"kind":"progress","bytes_done":500,"bytes_total":1000}}"#),
            format!(r#"{{"job":{id},"kind":"{outcome}","message":"finished"}}"#),
        ] {
            assert_eq!(post_event(&s, host, &ev).0, 200);
        }
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            out.status.success(),
            want_ok,
            "{host}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["hosts"][0]["state"], outcome);
        assert_eq!(v["hosts"][0]["bytes_done"], 500);
        // Later the rescue OS reports that the target stopped coming up: a done job stays
        // done, with the report as the host's last event; a failed one stays failed.
        let later = format!(
            r#"{{"job":{id},"kind":"failed","phase":"target-up","message":"the target did not come up"}}"#
        );
        assert_eq!(post_event(&s, host, &later).0, 200);
        let out = ok(s
            .reinstall("alice")
            .args(["status", "--host", host, "--json"]));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let job = &v["jobs"][0]["hosts"][0];
        assert_eq!(job["state"], outcome, "{v}");
        assert_eq!(
            job["last_event"]["event"]["message"], "the target did not come up",
            "{v}"
        );
        // The text view names a done host that reported a failure since; a failed job's
        // host is not singled out (its failure is the outcome).
        let out = ok(s.reinstall("alice").args(["status", "--host", host]));
        let flagged = format!("{host} (job {id} done), at ");
        assert_eq!(
            out.contains(&flagged) && out.contains(": the target did not come up"),
            outcome == "done",
            "{out}"
        );
    }
    // status lists both hosts; an agent identity cannot create jobs.
    let out = ok(s.reinstall("alice").args(["status", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["hosts"].as_array().unwrap().len(), 2);
    let err = fails(
        s.reinstall("web1")
            .args(["--host", "web1", "--target", "target"]),
    );
    assert!(
        err.contains("operator commands need an operator identity"),
        "{err}"
    );
    // A stager away for longer than --wait-outage: said, and exit 3 (the job did not fail;
    // it goes on), not at the first refused connection.
    let mut s = s;
    s.enroll("web3");
    let child = s
        .reinstall("alice")
        .args(["--host", "web3", "--target", "target", "--wait"])
        .args(["--wait-outage", "3"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !s.curl(Some("alice"), &[], "/v1/jobs").1.contains("web3") {
        assert!(t.elapsed() < Duration::from_secs(30), "no job for web3");
        std::thread::sleep(Duration::from_millis(100));
    }
    s.kill();
    let t = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{said}");
    assert!(
        t.elapsed() >= Duration::from_secs(3) && t.elapsed() < Duration::from_secs(20),
        "gave up after {:?}: {said}",
        t.elapsed()
    );
    assert!(
        said.contains("cannot reach the stager at ")
            && said.contains("still following for up to 3 s")
            && said.contains("the stager has not answered for 3 s; no longer following"),
        "{said}"
    );
    s.start();
}

#[test]
fn slow_clients_are_cut_off_and_do_not_stop_others() {
    use std::io::Read;
    let w = scratch();
    let mut s = Stager::new(w.path(), &small_target(w.path()));
    s.set_config("handshake_timeout_secs", "2");
    s.set_config("request_timeout_secs", "2");
    s.start();
    // 50 connections that never start TLS.
    let idle: Vec<std::net::TcpStream> = (0..50)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap())
        .collect();
    // Others are served meanwhile.
    let (code, _) = s.curl(Some("alice"), &[], "/v1/jobs");
    assert_eq!(code, 200);
    let t = Instant::now();
    for mut c in idle {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 1];
        let n = c.read(&mut b).unwrap_or(0);
        assert_eq!(
            n, 0,
            "the server sent data to a client that never said hello"
        );
    }
    assert!(
        t.elapsed() < Duration::from_secs(6),
        "idle connections held for {:?}",
        t.elapsed()
    );
    // A client that finishes TLS but sends its headers too slowly (slowloris).
    let p = s.pems("alice");
    let script = format!(
        r#"
import ssl, socket, time
c = ssl.create_default_context(cafile="{ca}")
c.load_cert_chain("{cert}", "{key}")
s = c.wrap_socket(socket.create_connection(("127.0.0.1", {port})), server_hostname="127.0.0.1")
s.sendall(b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\n")
t = time.time()
s.settimeout(20)
try:
    data = s.recv(1000)
except Exception as e:
    data = b""
print(round(time.time() - t, 1), len(data))
"#,
        ca = p.ca.display(),
        cert = p.cert.display(),
        key = p.key.display(),
        port = s.port
    );
    let out = ok(std::process::Command::new("python3").arg("-c").arg(&script));
    let secs: f64 = out.split_whitespace().next().unwrap().parse().unwrap();
    assert!(
        secs < 6.0,
        "slow headers held the connection for {secs} s: {out}"
    );
    let (code, _) = s.curl(Some("alice"), &[], "/healthz");
    assert_eq!(code, 200);
}

/// A fleet rollout: `--max-in-flight 1 --halt-after-failures 1` over three hosts. One host at
/// a time takes the job (the others are told there is no work, and may not read its
/// bundles); a host finishing wakes a waiting host's long poll at once; the first failure
/// halts the job: the host that had not taken it is cancelled, the job ends failed with the
/// reason, and `reinstall --wait` says so and exits 1.
#[test]
fn a_rollout_takes_hosts_one_at_a_time_and_halts_at_the_first_failure() {
    let w = scratch();
    let mut s = Stager::new(w.path(), &small_target(w.path()));
    s.enroll("web3");
    s.start();
    // Limits of 0 are refused by name, by the server and by the command.
    let (code, body) = post_job(
        &s,
        r#"{"hosts":["web1"],"target":"target","max_in_flight":0}"#,
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("max_in_flight is 0"), "{body}");
    let err = fails(s.reinstall("alice").args([
        "--host",
        "web1",
        "--target",
        "target",
        "--halt-after-failures",
        "0",
    ]));
    assert!(err.contains("--halt-after-failures"), "{err}");

    let mut c = s.reinstall("alice");
    c.args(["--host", "web1", "--host", "web2", "--host", "web3"])
        .args(["--target", "target", "--max-in-flight", "1"])
        .args(["--halt-after-failures", "1", "--wait"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let follower = c.spawn().unwrap();
    let work = |host: &str, wait: &str| -> Option<u64> {
        let (code, body) = s.curl(Some(host), &[], &format!("/v1/agent/work?wait={wait}"));
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["job"]["id"].as_u64()
    };
    let id = (0..50)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(200));
            work("web1", "0")
        })
        .expect("the job never reached web1");
    assert_eq!(work("web1", "0"), Some(id), "web1 keeps its job");
    assert_eq!(work("web2", "0"), None, "the only slot is web1's");
    assert_eq!(work("web3", "0"), None);
    // A waiting host may not fetch the job's bundles either.
    let (code, body) = s.curl(
        Some("web3"),
        &["-o", "/dev/null"],
        &format!("/v1/blobs/{}", s.sha_of("target")),
    );
    assert_eq!(code, 403, "{body}");
    let job = |s: &Stager| -> serde_json::Value {
        let (_, body) = s.curl(Some("alice"), &[], &format!("/v1/jobs/{id}"));
        serde_json::from_str(&body).unwrap()
    };
    let v = job(&s);
    assert_eq!(
        (v["max_in_flight"].as_u64(), v["hosts"][0]["state"].as_str()),
        (Some(1), Some("running")),
        "{v}"
    );
    assert_eq!(v["hosts"][1]["state"], "pending", "{v}");

    // web2 waits in a long poll; web1 finishing hands it the slot at once.
    std::thread::scope(|sc| {
        let polling = sc.spawn(|| {
            let t = Instant::now();
            (work("web2", "25"), t.elapsed())
        });
        std::thread::sleep(Duration::from_millis(1500));
        let done = format!(r#"{{"job":{id},"kind":"done","phase":"target-up"}}"#);
        assert_eq!(post_event(&s, "web1", &done).0, 200);
        let (got, took) = polling.join().unwrap();
        assert_eq!(got, Some(id));
        assert!(took < Duration::from_secs(10), "web2 waited {took:?}");
    });
    assert_eq!(work("web3", "0"), None, "web2 holds the slot now");
    let out = ok(s.reinstall("alice").arg("status"));
    assert!(
        out.contains(&format!(
            "job {id} (target@1 by alice, Active, at most 1 at a time, halt after 1 failure): 1 done, 1 running, 1 pending"
        )),
        "{out}"
    );

    // web2 fails: the job halts, web3 never takes it.
    let failed = format!(
        r#"{{"job":{id},"kind":"failed","phase":"stage-rescue","message":"disk 2 is too small"}}"#
    );
    assert_eq!(post_event(&s, "web2", &failed).0, 200);
    assert_eq!(work("web3", "0"), None);
    let v = job(&s);
    let states: Vec<&str> = (0..3)
        .map(|i| v["hosts"][i]["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["done", "failed", "cancelled"], "{v}");
    assert_eq!(v["state"], "failed", "{v}");
    let halted = v["halted"].as_str().unwrap_or_default();
    assert!(
        halted
            .contains("1 host failed (halt after 1); 1 host that had not taken the job cancelled"),
        "{v}"
    );
    let out = follower.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("job {id} halted at "))
            && err.contains(&format!("job {id}: 1 running, 2 pending"))
            && err.contains(&format!("job {id}: Failed (1 done, 1 failed, 1 cancelled)")),
        "{err}"
    );
    let (_, metrics) = s.curl(Some("alice"), &[], "/metrics");
    assert!(metrics.contains("\nstager_jobs_halted 1\n"), "{metrics}");
    // The same command again with --skip-done: the hosts not done with target@1 (web2
    // failed, web3 cancelled by the halt) get a new job; web1 is left out. Once more: both
    // are under way, nothing is left to do, and that is success.
    let again = |s: &Stager| {
        s.reinstall("alice")
            .args(["--host", "web1", "--host", "web2", "--host", "web3"])
            .args(["--target", "target", "--skip-done", "--json"])
            .output()
            .unwrap()
    };
    let out = again(&s);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("skipped, target@1 already 1 done (web1)"),
        "{err}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let hosts: Vec<&str> = v["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["host"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, ["web2", "web3"], "{v}");
    let id2 = v["id"].as_u64().unwrap();
    assert_eq!(work("web3", "0"), Some(id2));
    let out = again(&s);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "null", "{err}");
    assert!(
        err.contains("1 done (web1); 2 under way (web2, web3)"),
        "{err}"
    );
}

/// A host that took its job and then says nothing for `silent_after_secs` is shown as silent
/// in the job (`silent_s`), by `reinstall status`, and in `/metrics`, until its next event.
#[test]
fn a_running_host_that_goes_quiet_is_shown_silent_until_it_reports_again() {
    let w = scratch();
    let mut s = Stager::new(w.path(), &small_target(w.path()));
    s.set_config("silent_after_secs", "2");
    s.start();
    let id = create_job(&s, "web1");
    let (_, body) = s.curl(Some("web1"), &[], "/v1/agent/work");
    assert!(body.contains(&format!("\"id\": {id}")), "{body}");
    let silent = |s: &Stager| -> (Option<u64>, String, String) {
        let (_, body) = s.curl(Some("alice"), &[], &format!("/v1/jobs/{id}"));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let status = ok(s.reinstall("alice").arg("status"));
        let (_, metrics) = s.curl(Some("alice"), &[], "/metrics");
        let gauge = metrics
            .lines()
            .find(|l| l.starts_with("stager_host_jobs_silent "))
            .unwrap_or_default()
            .to_string();
        (v["hosts"][0]["silent_s"].as_u64(), status, gauge)
    };
    let (q, status, gauge) = silent(&s);
    assert_eq!(q, None, "just taken");
    assert!(!status.contains("SILENT"), "{status}");
    assert_eq!(gauge, "stager_host_jobs_silent 0");
    std::thread::sleep(Duration::from_millis(3000));
    let (q, status, gauge) = silent(&s);
    assert!(q.is_some_and(|q| q >= 2), "{q:?}");
    assert!(
        status.contains("web1") && status.contains("SILENT for "),
        "{status}"
    );
    assert_eq!(gauge, "stager_host_jobs_silent 1");
    let ev = format!(r#"{{"job":{id},"kind":"phase_entered","phase":"stage-rescue"}}"#);
    assert_eq!(post_event(&s, "web1", &ev).0, 200);
    let (q, status, gauge) = silent(&s);
    assert_eq!(q, None);
    assert!(!status.contains("SILENT"), "{status}");
    assert_eq!(gauge, "stager_host_jobs_silent 0");
}

/// `--max-in-flight-per-site 1`: web1 and web2 in site a, web3 in site b (`stager enroll
/// --site`). web1 and web3 take the job at once; web2 waits until web1, of its own site,
/// is done.
#[test]
fn a_rollout_takes_one_host_per_site_at_a_time() {
    let w = scratch();
    let mut s = Stager::new(w.path(), &small_target(w.path()));
    for (host, site) in [("web1", "a"), ("web2", "a"), ("web3", "b")] {
        // web1 and web2 are enrolled already: enrolled again, they move into their site.
        let mut out = s.identity(host);
        if out.exists() {
            out = w.path().join(format!("{host}-again.toml"));
        }
        let out = ok(stager()
            .args(["enroll", "--dir"])
            .arg(&s.home)
            .args([host, "--site", site, "--out"])
            .arg(out));
        assert!(
            out.contains(&format!("{host:?} is in site {site:?}")),
            "{out}"
        );
    }
    let err = fails(
        stager()
            .args(["enroll", "--dir"])
            .arg(&s.home)
            .args(["web4", "--site", "a b", "--out"])
            .arg(w.path().join("web4.toml")),
    );
    assert!(err.contains("--site"), "{err}");
    s.start();
    let out = ok(s.reinstall("alice").args([
        "--host",
        "web1",
        "--host",
        "web2",
        "--host",
        "web3",
        "--target",
        "target",
        "--max-in-flight-per-site",
        "1",
    ]));
    assert!(out.contains("at most 1 per site"), "{out}");
    let work = |host: &str| -> Option<u64> {
        let (_, body) = s.curl(Some(host), &[], "/v1/agent/work");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["job"]["id"].as_u64()
    };
    let id = work("web1").expect("web1 takes the job");
    assert_eq!(work("web2"), None, "site a has its one host in flight");
    assert_eq!(work("web3"), Some(id), "site b has none");
    let done = format!(r#"{{"job":{id},"kind":"done"}}"#);
    assert_eq!(post_event(&s, "web1", &done).0, 200);
    assert_eq!(work("web2"), Some(id), "web1 is done: site a has a slot");
    let (_, body) = s.curl(Some("alice"), &[], "/v1/hosts");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v[2]["site"], "b", "{v}");
}

/// The stager's own cap (`max_in_flight_per_site` in `stager.toml`) holds across jobs: four
/// one-host jobs with no limits of their own, three hosts in site a and one in b. One host of
/// a runs at a time, b's alongside; a host finishing, or its job being cancelled, hands the
/// slot to a host of another job at once (its long poll is woken); `/metrics` counts hosts in
/// flight by site. A cap of 0 in `stager.toml` stops `stager serve` naming the file and key.
#[test]
fn the_stagers_cap_per_site_holds_across_jobs() {
    let w = scratch();
    let mut s = Stager::new(w.path(), &small_target(w.path()));
    for (host, site) in [("web1", "a"), ("web2", "a"), ("web3", "b"), ("web4", "a")] {
        let mut out = s.identity(host);
        if out.exists() {
            out = w.path().join(format!("{host}-again.toml"));
        }
        ok(stager()
            .args(["enroll", "--dir"])
            .arg(&s.home)
            .args([host, "--site", site, "--out"])
            .arg(out));
    }
    s.set_config("max_in_flight_per_site", "0");
    let err = fails(stager().args(["serve", "--dir"]).arg(&s.home));
    assert!(
        err.contains("stager.toml") && err.contains("max_in_flight_per_site"),
        "{err}"
    );
    s.set_config("max_in_flight_per_site", "1");
    s.start();
    let jobs: Vec<u64> = ["web1", "web2", "web3", "web4"]
        .iter()
        .map(|h| create_job(&s, h))
        .collect();
    let work = |host: &str, wait: &str| -> Option<u64> {
        let (_, body) = s.curl(Some(host), &[], &format!("/v1/agent/work?wait={wait}"));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["job"]["id"].as_u64()
    };
    assert_eq!(work("web1", "0"), Some(jobs[0]));
    assert_eq!(work("web2", "0"), None, "site a has its one host in flight");
    assert_eq!(work("web4", "0"), None);
    assert_eq!(work("web3", "0"), Some(jobs[2]), "site b has none");
    let (code, body) = s.curl(
        Some("web2"),
        &["-o", "/dev/null"],
        &format!("/v1/blobs/{}", s.sha_of("target")),
    );
    assert_eq!(code, 403, "a host waiting for a slot may not fetch: {body}");
    let (_, metrics) = s.curl(Some("alice"), &[], "/metrics");
    for want in [
        "stager_hosts_in_flight{site=\"a\"} 1",
        "stager_hosts_in_flight{site=\"b\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == want), "{want}\n{metrics}");
    }
    // web1 finishes its job: one of web2 and web4, both long-polling, takes the slot.
    let taken = std::thread::scope(|sc| {
        let polls = ["web2", "web4"].map(|h| {
            let work = &work;
            (h, sc.spawn(move || (work(h, "25"), Instant::now())))
        });
        std::thread::sleep(Duration::from_millis(1500));
        let t = Instant::now();
        let done = format!(r#"{{"job":{},"kind":"done"}}"#, jobs[0]);
        assert_eq!(post_event(&s, "web1", &done).0, 200);
        let got: Vec<(&str, Option<u64>, Duration)> = polls
            .into_iter()
            .map(|(h, p)| {
                let (job, at) = p.join().unwrap();
                (h, job, at.saturating_duration_since(t))
            })
            .collect();
        let first: Vec<_> = got.iter().filter(|g| g.1.is_some()).collect();
        assert_eq!(first.len(), 1, "exactly one takes the slot: {got:?}");
        assert!(first[0].2 < Duration::from_secs(10), "{got:?}");
        first[0].0
    });
    let (other, other_job) = if taken == "web2" {
        ("web4", jobs[3])
    } else {
        ("web2", jobs[1])
    };
    let taken_job = if taken == "web2" { jobs[1] } else { jobs[3] };
    assert_eq!(work(other, "0"), None, "{taken} holds site a's slot");
    // The job holding the slot is cancelled: the other host's long poll is woken with its job.
    std::thread::scope(|sc| {
        let poll = sc.spawn(|| (work(other, "25"), Instant::now()));
        std::thread::sleep(Duration::from_millis(1500));
        let t = Instant::now();
        ok(s.reinstall("alice")
            .args(["cancel", &taken_job.to_string()]));
        let (got, at) = poll.join().unwrap();
        assert_eq!(got, Some(other_job));
        let took = at.saturating_duration_since(t);
        assert!(took < Duration::from_secs(10), "{other} waited {took:?}");
    });
}

/// `--canary 1`: the first host to take the job runs it alone, however many could run; once
/// it is done the others take it together. In a second job the canary fails: the job halts
/// at once (no --halt-after-failures given) and the waiting hosts are cancelled.
#[test]
fn a_canary_runs_alone_first_and_its_failure_halts_the_job() {
    let w = scratch();
    let mut s = Stager::new(w.path(), &small_target(w.path()));
    s.enroll("web3");
    s.start();
    let work = |host: &str| -> Option<u64> {
        let (_, body) = s.curl(Some(host), &[], "/v1/agent/work");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["job"]["id"].as_u64()
    };
    let create = || -> String {
        ok(s.reinstall("alice").args([
            "--host", "web1", "--host", "web2", "--host", "web3", "--target", "target", "--canary",
            "1",
        ]))
    };
    let out = create();
    assert!(out.contains("1 canary first"), "{out}");
    let id = work("web2").expect("the first to ask is the canary");
    assert_eq!(
        (work("web1"), work("web3")),
        (None, None),
        "the canary runs alone"
    );
    let ev = |kind: &str| format!(r#"{{"job":{id},"kind":"{kind}"}}"#);
    assert_eq!(post_event(&s, "web2", &ev("progress")).0, 200);
    assert_eq!(work("web1"), None, "the canary is not done yet");
    assert_eq!(post_event(&s, "web2", &ev("done")).0, 200);
    assert_eq!(
        (work("web1"), work("web3")),
        (Some(id), Some(id)),
        "no other limit"
    );
    for h in ["web1", "web3"] {
        assert_eq!(post_event(&s, h, &ev("done")).0, 200);
    }

    create();
    let id = work("web3").expect("the canary of the second job");
    let failed = format!(r#"{{"job":{id},"kind":"failed","message":"no network after boot"}}"#);
    assert_eq!(post_event(&s, "web3", &failed).0, 200);
    assert_eq!((work("web1"), work("web2")), (None, None));
    let (_, body) = s.curl(Some("alice"), &[], &format!("/v1/jobs/{id}"));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["state"], "failed", "{v}");
    assert!(
        v["halted"]
            .as_str()
            .unwrap_or_default()
            .contains("1 host failed (the canary); 2 hosts that had not taken the job cancelled"),
        "{v}"
    );
}

/// A started stager whose target bundle holds `random` bytes of /dev/urandom (they do not
/// compress: a blob of about that size, many frames to relay).
fn stager_with_random(w: &tempfile::TempDir, random: u64) -> Stager {
    let target = small_target(w.path());
    ok(std::process::Command::new("head")
        .args(["-c", &random.to_string(), "/dev/urandom"])
        .stdout(std::fs::File::create(target.join("etc/random")).unwrap()));
    let mut s = Stager::new(w.path(), &target);
    s.start();
    s
}

/// [`stager_with_random`] and a site relay for it, initialized but not started.
fn stager_and_relay(
    w: &tempfile::TempDir,
    random: u64,
) -> (Stager, integration_tests::stager::Relay) {
    let s = stager_with_random(w, random);
    let relay = integration_tests::stager::Relay::init(&s, "pop-a");
    (s, relay)
}

/// A site relay (`stager relay init`, `stager relay serve`) between the agents and the
/// stager: every request is forwarded as the agent that made it (its job, its events,
/// refusals for a host with no job, for a revoked host); a blob two hosts fetch at once
/// crosses to the relay once and reaches both whole; `Range` works through it; the relay's
/// certificate alone gets nothing from the stager; an `--via` identity names the relay; and
/// with the stager gone the relay answers 502 naming it (an agent retries 5xx).
#[test]
fn a_site_relay_forwards_agents_and_fetches_each_blob_once() {
    let w = scratch();
    let (mut s, mut relay) = stager_and_relay(&w, 24 << 20);
    let err = fails(
        stager()
            .args(["relay", "init", "--dir"])
            .arg(&s.home)
            .args(["--name", "pop-a", "--san", "127.0.0.1", "--out"])
            .arg(&relay.dir),
    );
    assert!(err.contains("already exists"), "{err}");
    let err = fails(
        stager()
            .args(["relay", "init", "--dir"])
            .arg(&s.home)
            .args(["--name", "web1", "--san", "127.0.0.1", "--out"])
            .arg(w.path().join("relay-web1")),
    );
    assert!(err.contains("already holds agent certificates"), "{err}");
    relay.start();
    let via = relay.url("");
    let id3 = ok(stager()
        .args(["enroll", "--dir"])
        .arg(&s.home)
        .args(["web3", "--via", &via, "--out"])
        .arg(s.identity("web3")));
    assert!(id3.contains("web3"), "{id3}");
    let text = std::fs::read_to_string(s.identity("web3")).unwrap();
    assert!(text.contains(&format!("stager = \"{via}\"")), "{text}");
    assert!(
        text.contains(&format!("fallback = [\"{}\"]", s.url(""))),
        "the stager itself, for when the relay is down: {text}"
    );
    let err = fails(
        stager()
            .args(["enroll", "--dir"])
            .arg(&s.home)
            .args(["web4", "--via", "http://plain", "--out"])
            .arg(w.path().join("web4.toml")),
    );
    assert!(err.contains("--via"), "{err}");

    let at = |name: &str, args: &[&str], path: &str| s.curl_at(&relay.url(path), Some(name), args);
    let (code, body) = at("web1", &[], "/healthz");
    assert_eq!(code, 200, "{body}");
    let (code, body) = post_job(&s, r#"{"hosts":["web1","web2"],"target":"target"}"#);
    assert_eq!(code, 201, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
        .as_u64()
        .unwrap();
    let (code, body) = at("web1", &[], "/v1/agent/work");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(&format!("\"id\": {id}")), "{body}");
    let ev = format!(r#"{{"job":{id},"kind":"phase_entered","phase":"stage-rescue"}}"#);
    let (code, body) = at(
        "web1",
        &["-H", "content-type: application/json", "-d", &ev],
        "/v1/agent/events",
    );
    assert_eq!(code, 200, "{body}");
    let (_, job) = s.curl(Some("alice"), &[], &format!("/v1/jobs/{id}"));
    assert!(
        job.contains("stage-rescue"),
        "the event reached the stager: {job}"
    );

    // web1 and web2 fetch the target blob at the same time, through the relay.
    let sha = s.sha_of("target");
    let size = s.blob_len(&sha);
    let served_before = stager_metric(&s, "stager_bytes_served_total");
    std::thread::scope(|sc| {
        let fetches: Vec<_> = ["web1", "web2"]
            .map(|h| {
                let out = w.path().join(format!("{h}.blob"));
                let at = &at;
                let sha = &sha;
                sc.spawn(move || {
                    let (code, body) = at(
                        h,
                        &["-o", out.to_str().unwrap()],
                        &format!("/v1/blobs/{sha}"),
                    );
                    (code, body, out)
                })
            })
            .into_iter()
            .collect();
        for f in fetches {
            let (code, body, out) = f.join().unwrap();
            assert_eq!(code, 200, "{body}");
            let got = sh(&format!("sha256sum {} | cut -d' ' -f1", out.display()));
            assert_eq!(got.trim(), sha, "{}", out.display());
        }
    });
    let (_, health) = at("web1", &[], "/healthz");
    let h: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(h["bytes_from_upstream"].as_u64(), Some(size), "{h}");
    assert_eq!(h["bytes_served"].as_u64(), Some(2 * size), "{h}");
    let (code, metrics) = at("web1", &[], "/metrics");
    assert_eq!(code, 200, "{metrics}");
    for want in [
        format!("relay_bytes_from_upstream_total {size}"),
        format!("relay_bytes_served_total {}", 2 * size),
        "relay_cache_broken 0".to_string(),
        "relay_fills 0".to_string(),
    ] {
        assert!(metrics.lines().any(|l| l == want), "{want}\n{metrics}");
    }
    assert!(
        metrics.contains("relay_requests_total{route=\"GET /v1/blobs/:id\",status=\"200\"} 2"),
        "{metrics}"
    );
    let upstream = stager_metric(&s, "stager_bytes_served_total") - served_before;
    assert!(
        upstream >= size && upstream < size + 16,
        "the stager sent {upstream} bytes for a {size}-byte blob fetched twice"
    );
    assert!(relay.dir.join("cache").join(&sha).exists());
    // Range through the relay, from its cache.
    let tail = w.path().join("tail");
    let (code, _) = at(
        "web2",
        &["-r", "1000-", "-o", tail.to_str().unwrap()],
        &format!("/v1/blobs/{sha}"),
    );
    assert_eq!(code, 206);
    assert_eq!(std::fs::metadata(&tail).unwrap().len(), size - 1000);

    // Refusals come from the stager, as if the agent had asked it.
    let (code, body) = at("web3", &["-o", "-"], &format!("/v1/blobs/{sha}"));
    assert_eq!(code, 403, "web3 has no job: {body}");
    assert!(body.contains("web3"), "{body}");
    ok(stager().args(["revoke", "--dir"]).arg(&s.home).arg("web2"));
    let (code, body) = at("web2", &[], "/v1/agent/work");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("revoked"), "{body}");
    // A relay acts for its own site's hosts only (this one: hosts without a site).
    s.enroll_in("web4", "b");
    let (code, body) = at("web4", &[], "/v1/agent/work");
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains(r#"relay \"pop-a\" serves no site; host \"web4\" is in site \"b\""#),
        "{body}"
    );
    // The relay's own certificate, straight to the stager, acts for nobody.
    let r = &relay.dir;
    let out = sh(&format!(
        "curl -sS -w '\\n%{{http_code}}' --cacert {ca} --cert {cert} --key {key} {url}",
        ca = r.join("ca.pem").display(),
        cert = r.join("relay.pem").display(),
        key = r.join("relay.key").display(),
        url = s.url("/v1/agent/work")
    ));
    assert!(
        out.ends_with("403") && out.contains("may only forward agents"),
        "{out}"
    );
    // Every forwarded request had its own connection to the stager, closed once answered.
    let open = (0..50)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(100));
            stager_metric(&s, "stager_connections")
        })
        .find(|&n| n == 1);
    assert_eq!(
        open,
        Some(1),
        "connections the relay left open to the stager"
    );
    // The stager gone: 502, naming it.
    let url = relay.url("/v1/agent/work");
    s.kill();
    let (code, body) = s.curl_at(&url, Some("web1"), &[]);
    assert_eq!(code, 502, "{body}");
    assert!(body.contains(&s.url("")), "{body}");
}

fn stager_metric(s: &Stager, name: &str) -> u64 {
    stager_metric_labelled(s, name)
}

/// A sample of the stager's `/metrics`: a name, with its labels if it has any.
fn stager_metric_labelled(s: &Stager, sample: &str) -> u64 {
    let (_, m) = s.curl(Some("alice"), &[], "/metrics");
    m.lines()
        .find_map(|l| l.strip_prefix(&format!("{sample} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {sample} in {m}"))
}

/// Relays chain (tiered site stagers): a site's relay (pop-a) whose upstream is a regional
/// relay serving sites pop-a and pop-b. A pop-a host works through both: its job, its
/// events, its blob, which crosses from the stager to the regional relay once and from there
/// to the site's relay once. Every relay of the chain must serve the host's site (the
/// stager names the one that does not); a host cannot pass itself off as a relay; revoking
/// the regional relay cuts off the chain; a relay whose upstream leads back to itself stops
/// after 4 hops (508).
#[test]
fn relays_chain_and_every_relay_of_the_chain_must_serve_the_hosts_site() {
    use integration_tests::stager::Relay;
    let w = scratch();
    let s = stager_with_random(&w, 16 << 20);
    let mut hub = Relay::init_with(&s, "region-eu", &["--site", "pop-a", "--site", "pop-b"]);
    let mut pop = Relay::init_with(
        &s,
        "pop-a",
        &["--site", "pop-a", "--upstream", &hub.url("")],
    );
    s.enroll("web3");
    for (h, site) in [("web1", "pop-a"), ("web2", "pop-b"), ("web3", "pop-c")] {
        s.enroll_in(h, site);
    }
    let (code, body) = post_job(&s, r#"{"hosts":["web1","web2","web3"],"target":"target"}"#);
    assert_eq!(code, 201, "{body}");
    let job = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
        .as_u64()
        .unwrap();
    hub.start();
    pop.start();
    let at = |r: &Relay, host: &str, args: &[&str], path: &str| {
        s.curl_at(&r.url(path), Some(host), args)
    };
    let sha = s.sha_of("target");
    let size = s.blob_len(&sha);

    // web1 (pop-a) through pop-a's relay and the regional one.
    let (code, body) = at(&pop, "web1", &[], "/v1/agent/work");
    assert_eq!(code, 200, "{body}");
    let work: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(work["job"]["id"].as_u64(), Some(job), "{body}");
    let ev = format!(
        r#"{{"job":{job},"kind":"progress","phase":"plan","message":"through two relays"}}"#
    );
    let (code, body) = at(
        &pop,
        "web1",
        &["-H", "content-type: application/json", "-d", &ev],
        "/v1/agent/events",
    );
    assert_eq!(code, 200, "{body}");
    let (_, body) = s.curl(Some("alice"), &[], &format!("/v1/jobs/{job}"));
    assert!(body.contains("through two relays"), "{body}");
    let out = w.path().join("blob");
    let (code, body) = at(
        &pop,
        "web1",
        &["-o", out.to_str().unwrap()],
        &format!("/v1/blobs/{sha}"),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        sh(&format!("sha256sum {} | cut -d' ' -f1", out.display())).trim(),
        sha
    );
    let crossed = |r: &Relay| {
        let (_, h) = s.curl_at(&r.url("/healthz"), Some("web1"), &[]);
        serde_json::from_str::<serde_json::Value>(&h).unwrap()["bytes_from_upstream"]
            .as_u64()
            .unwrap()
    };
    assert_eq!((crossed(&hub), crossed(&pop)), (size, size));
    let (_, m) = s.curl(Some("alice"), &[], "/metrics");
    assert!(
        m.contains(r#"stager_requests_total{route="GET /v1/blobs/:id",status="200"} 1"#),
        "the stager sent the blob whole once: {m}"
    );

    // Every relay of the chain serves the host's site, or the stager refuses, naming it.
    let (code, body) = at(&pop, "web2", &[], "/v1/agent/work");
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains(
            r#"relay \"pop-a\" serves site \"pop-a\"; host \"web2\" is in site \"pop-b\""#
        ),
        "{body}"
    );
    let (code, body) = at(&hub, "web2", &[], "/v1/agent/work");
    assert_eq!(code, 200, "the regional relay serves pop-b: {body}");
    let (code, body) = at(&hub, "web3", &[], "/v1/agent/work");
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains(r#"relay \"region-eu\" serves site \"pop-a\", \"pop-b\"; host \"web3\" is in site \"pop-c\""#),
        "{body}"
    );

    // A host that sends the relay header itself is taken for a relay below, and refused.
    let web2 = s.pems("web2");
    let fp = sh(&format!(
        "openssl x509 -in {} -outform der | sha256sum | cut -d' ' -f1",
        web2.cert.display()
    ));
    let (code, body) = at(
        &hub,
        "web1",
        &["-H", &format!("x-reinstall-relayed-for: {}", fp.trim())],
        "/v1/agent/work",
    );
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains(r#"as if through relay \"web1\", which is a agent certificate"#),
        "{body}"
    );

    // Revoking the regional relay cuts off everything below it.
    ok(stager()
        .args(["revoke", "--dir"])
        .arg(&s.home)
        .arg("region-eu"));
    let (code, body) = at(&pop, "web1", &[], "/v1/agent/work");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("revoked"), "{body}");

    // A relay whose upstream is itself.
    let mut lp = Relay::init(&s, "loop");
    lp.set("upstream", &format!("\"{}\"", lp.url("")));
    lp.start();
    let (code, body) = at(&lp, "web1", &[], "/v1/agent/work");
    assert_eq!(code, 508, "{body}");
    assert!(body.contains("lead back to itself"), "{body}");
}

/// A site relay serves every blob even when its cache cannot hold it. On a 1 MiB tmpfs the
/// 8 MiB blob cannot fit (`cache_keep_free_percent`): it passes through uncached, whole from
/// the first request, and nothing is written. On a cache that fails (remounted read-only) the
/// relay passes every blob through for the next 10 minutes, `Range` and all, and `/healthz`
/// says why.
#[test]
fn a_site_relay_passes_through_what_its_cache_cannot_hold() {
    let w = scratch();
    let (s, mut relay) = stager_and_relay(&w, 8 << 20);
    let cache = relay.dir.join("cache");
    let _tmpfs = integration_tests::Tmpfs::mount(&cache, "1m");
    relay.start();
    create_job(&s, "web1");
    let sha = s.sha_of("target");
    let size = s.blob_len(&sha);
    let at = |args: &[&str], path: &str| s.curl_at(&relay.url(path), Some("web1"), args);
    let health = || -> serde_json::Value {
        let (code, h) = at(&[], "/healthz");
        assert_eq!(code, 200, "{h}");
        serde_json::from_str(&h).unwrap()
    };
    let hash = |f: &std::path::Path| sh(&format!("sha256sum {} | cut -d' ' -f1", f.display()));
    let fetch = |out: &std::path::Path| {
        let (code, body) = at(&["-o", out.to_str().unwrap()], &format!("/v1/blobs/{sha}"));
        assert_eq!(code, 200, "{body}");
        assert_eq!(hash(out).trim(), sha);
        assert_eq!(std::fs::metadata(out).unwrap().len(), size);
    };

    let out = w.path().join("blob");
    fetch(&out);
    let h = health();
    assert_eq!(h["not_cached"], 1, "{h}");
    assert!(h["cache_broken"].is_null(), "{h}");
    assert_eq!(
        std::fs::read_dir(&cache).unwrap().count(),
        0,
        "nothing written to a cache the blob cannot fit"
    );

    // Room enough, but the disk fails: the download cannot start, the blob passes through,
    // and so does every blob for a while.
    ok(std::process::Command::new("mount")
        .args(["-o", "remount,size=64m,ro"])
        .arg(&cache));
    let again = w.path().join("again");
    fetch(&again);
    let h = health();
    let why = h["cache_broken"].as_str().unwrap_or_default();
    assert!(why.contains("creating") && why.contains("cache"), "{h}");
    let range = w.path().join("range");
    let (code, _) = at(
        &["-r", "1000-1999", "-o", range.to_str().unwrap()],
        &format!("/v1/blobs/{sha}"),
    );
    assert_eq!(code, 206);
    let blob = std::fs::read(s.blob_path(&sha)).unwrap();
    assert_eq!(std::fs::read(&range).unwrap(), &blob[1000..2000]);
    // Refusals still come from the stager.
    let (code, body) = s.curl_at(
        &relay.url(&format!("/v1/blobs/{sha}")),
        Some("web2"),
        &["-o", "-"],
    );
    assert_eq!(code, 403, "{body}");
}

/// A site relay whose cache disk fills behind its back while it downloads a blob (the
/// filesystem shrunk under it, as another program's files would take the room): the write
/// fails, the half-written file is deleted (the space it held is what the disk lacks), the
/// agent reading along is cut short and its resume (`Range`) is passed through from the
/// stager, so it gets the blob whole; `/healthz` says why, and the next agent's request for
/// it passes through whole too.
#[test]
fn a_site_relay_whose_cache_disk_fills_mid_download_still_serves_the_blob() {
    let w = scratch();
    let (s, mut relay) = stager_and_relay(&w, 24 << 20);
    let wan = integration_tests::stager::WanProxy::holding(s.port, 8 << 20);
    relay.set("upstream", &format!("\"https://127.0.0.1:{}\"", wan.port));
    let cache = relay.dir.join("cache");
    let _tmpfs = integration_tests::Tmpfs::mount(&cache, "64m");
    relay.start();
    create_job(&s, "web1");
    let sha = s.sha_of("target");
    let size = s.blob_len(&sha);
    let url = relay.url(&format!("/v1/blobs/{sha}"));
    let out = w.path().join("blob");
    let first = std::thread::scope(|t| {
        let fetch = t.spawn(|| s.curl_at(&url, Some("web1"), &["-o", out.to_str().unwrap()]));
        let held = std::time::Instant::now();
        while wan.hits() == 0 {
            assert!(
                held.elapsed() < std::time::Duration::from_secs(30),
                "the download never reached 8 MiB"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // At most 8 MiB are in the cache now: 12 MiB leaves no room for the rest.
        ok(std::process::Command::new("mount")
            .args(["-o", "remount,size=12m"])
            .arg(&cache));
        wan.release();
        fetch.join().unwrap()
    });
    let got = std::fs::metadata(&out).map_or(0, |m| m.len());
    assert!(
        got < size,
        "the first reader was not cut short ({got} of {size} bytes; curl said {first:?})"
    );
    let (_, h) = s.curl_at(&relay.url("/healthz"), Some("web1"), &[]);
    let h: serde_json::Value = serde_json::from_str(&h).unwrap();
    let why = h["cache_broken"].as_str().unwrap_or_default();
    assert!(
        why.contains("writing") && why.contains(&format!("{sha}.part")),
        "{h}"
    );
    assert_eq!(
        std::fs::read_dir(&cache).unwrap().count(),
        0,
        "the half-written blob is left in the cache"
    );
    // The agent resumes where it was cut: passed through from the stager.
    let (code, body) = s.curl_at(
        &url,
        Some("web1"),
        &["-C", "-", "-o", out.to_str().unwrap()],
    );
    assert_eq!(code, 206, "{body}");
    let hash = |f: &std::path::Path| sh(&format!("sha256sum {} | cut -d' ' -f1", f.display()));
    assert_eq!(hash(&out).trim(), sha);
    let again = w.path().join("again");
    let (code, body) = s.curl_at(&url, Some("web1"), &["-o", again.to_str().unwrap()]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(hash(&again).trim(), sha);
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 0);
}

/// The WAN under a site relay goes silent in the middle of a blob (no FIN, no RST: a proxy
/// that holds the connection for good, as a partition would): the relay's download gives up
/// on it after `upstream_stall_secs` (2 s here) and goes on from the byte it had on a new
/// connection, so the agent reading along gets the whole blob, and the WAN carries it once.
/// Without the stall timeout the download, and every agent waiting on it, waited for good.
#[test]
fn a_site_relay_whose_upstream_goes_silent_mid_download_goes_on_over_a_new_connection() {
    let w = scratch();
    let (s, mut relay) = stager_and_relay(&w, 24 << 20);
    let wan = integration_tests::stager::WanProxy::holding(s.port, 8 << 20);
    relay.set("upstream", &format!("\"https://127.0.0.1:{}\"", wan.port));
    relay.set("upstream_stall_secs", "2");
    relay.start();
    create_job(&s, "web1");
    let sha = s.sha_of("target");
    let size = s.blob_len(&sha);
    let out = w.path().join("blob");
    let t = std::time::Instant::now();
    let (code, body) = s.curl_at(
        &relay.url(&format!("/v1/blobs/{sha}")),
        Some("web1"),
        &["-o", out.to_str().unwrap()],
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(wan.hits(), 1, "the WAN never went silent");
    let got = sh(&format!("sha256sum {} | cut -d' ' -f1", out.display()));
    assert_eq!(got.trim(), sha, "after {:?}", t.elapsed());
    assert!(
        t.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        t.elapsed()
    );
    let (_, h) = s.curl_at(&relay.url("/healthz"), Some("web1"), &[]);
    let h: serde_json::Value = serde_json::from_str(&h).unwrap();
    assert_eq!(h["bytes_from_upstream"].as_u64(), Some(size), "{h}");
}

/// A site relay's cache keeps within `cache_max_mib`: three 8 MiB blobs with room for two.
/// A blob served from the cache counts as used, so the third blob's download deletes the
/// least recently served one, not the oldest download; a deleted blob asked for again
/// crosses again. A blob bigger than the cap passes through whole and deletes nothing.
#[test]
fn a_site_relays_cache_keeps_within_its_cap_dropping_the_least_recently_served() {
    let w = scratch();
    let (s, mut relay) = stager_and_relay(&w, 8 << 20);
    s.enroll("web3");
    for (host, bundle) in [("web1", "target"), ("web2", "t2"), ("web3", "t3")] {
        if bundle != "target" {
            let tree = w.path().join(bundle);
            std::fs::create_dir_all(tree.join("etc")).unwrap();
            ok(std::process::Command::new("head")
                .args(["-c", &(8u64 << 20).to_string(), "/dev/urandom"])
                .stdout(std::fs::File::create(tree.join("etc/random")).unwrap()));
            ok(stager()
                .args(["bundle", "build", "--dir"])
                .arg(&s.home)
                .args(["--name", bundle, "--version", "1", "--kind", "target"])
                .args(["--os", "linux"])
                .arg(&tree));
        }
        let (code, body) = post_job(
            &s,
            &format!(r#"{{"hosts":["{host}"],"target":"{bundle}"}}"#),
        );
        assert_eq!(code, 201, "{body}");
    }
    relay.set("cache_max_mib", "20");
    relay.start();
    let cache = relay.dir.join("cache");
    let sha = |b: &str| s.sha_of(b);
    let (a, b, c) = (sha("target"), sha("t2"), sha("t3"));
    let health = |relay: &integration_tests::stager::Relay| -> serde_json::Value {
        let (_, h) = s.curl_at(&relay.url("/healthz"), Some("web1"), &[]);
        serde_json::from_str(&h).unwrap()
    };
    let from_upstream = |relay: &integration_tests::stager::Relay| {
        health(relay)["bytes_from_upstream"].as_u64().unwrap()
    };
    let len = |sha: &str| s.blob_len(sha);
    let fetch = |relay: &integration_tests::stager::Relay, host: &str, sha: &str| {
        let out = w.path().join(format!("{host}-blob"));
        let (code, body) = s.curl_at(
            &relay.url(&format!("/v1/blobs/{sha}")),
            Some(host),
            &["-o", out.to_str().unwrap()],
        );
        assert_eq!(code, 200, "{body}");
        assert_eq!(std::fs::metadata(&out).unwrap().len(), len(sha));
        // mtimes order the blobs' uses: let them differ.
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let cached = || {
        let mut v: Vec<String> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let sorted = |mut v: Vec<&String>| {
        v.sort();
        v.into_iter().cloned().collect::<Vec<_>>()
    };

    fetch(&relay, "web1", &a);
    fetch(&relay, "web2", &b);
    assert_eq!(cached(), sorted(vec![&a, &b]));
    assert_eq!(from_upstream(&relay), len(&a) + len(&b));
    // a served from the cache (nothing crosses), so b is now the least recently used.
    fetch(&relay, "web1", &a);
    assert_eq!(from_upstream(&relay), len(&a) + len(&b));
    fetch(&relay, "web3", &c);
    assert_eq!(
        cached(),
        sorted(vec![&a, &c]),
        "b, served longest ago, went"
    );
    let h = health(&relay);
    assert_eq!(h["cache_evicted"], 1, "{h}");
    assert_eq!(h["cache_bytes"].as_u64(), Some(len(&a) + len(&c)), "{h}");
    // b again: it crosses again, and a goes (c was served since).
    fetch(&relay, "web2", &b);
    assert_eq!(cached(), sorted(vec![&b, &c]));
    assert_eq!(from_upstream(&relay), 2 * len(&b) + len(&a) + len(&c));
    let (_, metrics) = s.curl_at(&relay.url("/metrics"), Some("web1"), &[]);
    for want in [
        "relay_cache_evicted_total 2".to_string(),
        format!("relay_cache_bytes {}", len(&b) + len(&c)),
        "relay_not_cached_total 0".to_string(),
    ] {
        assert!(metrics.contains(&want), "{want} not in {metrics}");
    }

    // A cap below one blob: a passes through whole, and the cache keeps what it has.
    relay.kill();
    relay.set("cache_max_mib", "4");
    relay.start();
    let before = from_upstream(&relay);
    fetch(&relay, "web1", &a);
    assert_eq!(cached(), sorted(vec![&b, &c]));
    let h = health(&relay);
    assert_eq!(
        (h["not_cached"].as_u64(), h["cache_evicted"].as_u64()),
        (Some(1), Some(0)),
        "{h}"
    );
    assert_eq!(
        h["bytes_from_upstream"].as_u64(),
        Some(0),
        "passed through, not fetched: {h} (before: {before})"
    );
}

/// A WAN cut in the middle of a relay's download (a proxy between the relay and the stager
/// cuts the connection after 12 MiB of a 24 MiB blob) is resumed with `Range` where it
/// stopped: the agent reading through the relay never sees the cut and gets the blob whole,
/// and the stager sends it once: one whole answer (200) and, besides the relay's one-byte
/// probe, one `Range` answer (206) for the rest.
#[test]
fn a_site_relay_resumes_a_download_the_wan_cuts() {
    let w = scratch();
    let (s, mut relay) = stager_and_relay(&w, 24 << 20);
    let wan = integration_tests::stager::WanProxy::cutting(s.port, 12 << 20);
    relay.set("upstream", &format!("\"https://127.0.0.1:{}\"", wan.port));
    relay.start();
    create_job(&s, "web1");
    let sha = s.sha_of("target");
    let size = s.blob_len(&sha);
    let out = w.path().join("blob");
    let (code, body) = s.curl_at(
        &relay.url(&format!("/v1/blobs/{sha}")),
        Some("web1"),
        &["-o", out.to_str().unwrap()],
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        sh(&format!("sha256sum {} | cut -d' ' -f1", out.display())).trim(),
        sha
    );
    assert_eq!(wan.hits(), 1, "the proxy did not cut the download");
    let (_, h) = s.curl_at(&relay.url("/healthz"), Some("web1"), &[]);
    let h: serde_json::Value = serde_json::from_str(&h).unwrap();
    assert_eq!(h["bytes_from_upstream"].as_u64(), Some(size), "{h}");
    assert!(relay.dir.join("cache").join(&sha).exists());
    let (_, m) = s.curl(Some("alice"), &[], "/metrics");
    let blob_answers = |status: u16| {
        let key =
            format!(r#"stager_requests_total{{route="GET /v1/blobs/:id",status="{status}"}} "#);
        m.lines()
            .find_map(|l| l.strip_prefix(&key))
            .map_or(0, |v| v.trim().parse::<u64>().unwrap())
    };
    assert_eq!(
        (blob_answers(200), blob_answers(206)),
        (1, 2),
        "the stager's blob answers: one whole, the probe and one resumed ({m})"
    );
}

/// A site relay goes on from what an earlier download left in `cache/SHA.part` (a relay
/// stopped halfway): only the rest crosses from the stager. A leftover that is not the
/// blob's (same length, other bytes) is found out by the hash: that reader is cut short, the
/// file deleted, and the next request gets the blob whole.
#[test]
fn a_site_relay_goes_on_from_a_half_downloaded_blob() {
    use integration_tests::stager::Relay;
    let w = scratch();
    let (s, mut relay) = stager_and_relay(&w, 8 << 20);
    create_job(&s, "web1");
    let sha = s.sha_of("target");
    let blob = std::fs::read(s.blob_path(&sha)).unwrap();
    let half = blob.len() / 2;
    let cache = relay.dir.join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let part = cache.join(format!("{sha}.part"));
    let hash = |f: &std::path::Path| sh(&format!("sha256sum {} | cut -d' ' -f1", f.display()));
    let health = |relay: &Relay| -> serde_json::Value {
        let (_, h) = s.curl_at(&relay.url("/healthz"), Some("web1"), &[]);
        serde_json::from_str(&h).unwrap()
    };
    let fetch = |relay: &Relay, out: &std::path::Path| {
        s.curl_at(
            &relay.url(&format!("/v1/blobs/{sha}")),
            Some("web1"),
            &["-o", out.to_str().unwrap()],
        )
    };

    // Half of the right bytes: the other half comes from the stager.
    std::fs::write(&part, &blob[..half]).unwrap();
    relay.start();
    let out = w.path().join("blob");
    assert_eq!(fetch(&relay, &out).0, 200);
    assert_eq!(hash(&out).trim(), sha);
    assert_eq!(
        health(&relay)["bytes_from_upstream"].as_u64(),
        Some((blob.len() - half) as u64)
    );
    assert!(cache.join(&sha).exists() && !part.exists());

    // Half of other bytes: cut short, deleted, then whole.
    relay.kill();
    std::fs::remove_file(cache.join(&sha)).unwrap();
    let mut wrong = blob[..half].to_vec();
    wrong[100] ^= 1;
    std::fs::write(&part, &wrong).unwrap();
    relay.start();
    let _ = fetch(&relay, &out);
    assert_ne!(
        hash(&out).trim(),
        sha,
        "a wrong blob reached its reader whole"
    );
    assert!(!part.exists() && !cache.join(&sha).exists());
    assert_eq!(fetch(&relay, &out).0, 200);
    assert_eq!(hash(&out).trim(), sha);
    assert!(cache.join(&sha).exists());
}

/// `--halt-at-failure-percent 20` over six hosts: the first failure alone (1 of 1 finished)
/// does not halt, since one host is not yet a rate; once five have finished, one failure in
/// five is 20%, and the job halts: the sixth, not yet started, is cancelled. Out-of-range
/// percentages are refused by the CLI and by the API.
#[test]
fn a_rollout_halts_when_its_failure_rate_is_reached() {
    let w = scratch();
    let mut s = Stager::new(w.path(), &small_target(w.path()));
    let hosts = ["web1", "web2", "web3", "web4", "web5", "web6"];
    for h in &hosts[2..] {
        s.enroll(h);
    }
    s.start();
    let err = fails(s.reinstall("alice").args([
        "--host",
        "web1",
        "--target",
        "target",
        "--halt-at-failure-percent",
        "101",
    ]));
    assert!(err.contains("--halt-at-failure-percent"), "{err}");
    let (code, body) = post_job(
        &s,
        r#"{"hosts":["web1"],"target":"target","halt_at_failure_percent":101}"#,
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("halt_at_failure_percent"), "{body}");
    let mut args = vec!["--target", "target", "--halt-at-failure-percent", "20"];
    for h in &hosts {
        args.extend(["--host", h]);
    }
    let out = ok(s.reinstall("alice").args(&args));
    assert!(out.contains("halt at 20% failed"), "{out}");
    let id = out
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no job number in {out:?}"));
    let job = |s: &Stager| -> serde_json::Value {
        let (_, body) = s.curl(Some("alice"), &[], &format!("/v1/jobs/{id}"));
        serde_json::from_str(&body).unwrap()
    };
    let finish = |h: &str, kind: &str| {
        let (_, body) = s.curl(Some(h), &[], "/v1/agent/work");
        assert!(body.contains(&format!("\"id\": {id}")), "{h}: {body}");
        let ev = format!(r#"{{"job":{id},"kind":"{kind}"}}"#);
        assert_eq!(post_event(&s, h, &ev).0, 200);
    };
    finish("web1", "failed");
    for h in ["web2", "web3", "web4"] {
        assert_eq!(job(&s)["halted"], serde_json::Value::Null, "{h}");
        finish(h, "done");
    }
    assert_eq!(
        job(&s)["halted"],
        serde_json::Value::Null,
        "1 of 4 is 25%, but 4 finished are fewer than the 5 a 20% rate needs"
    );
    finish("web5", "done");
    let v = job(&s);
    let halted = v["halted"].as_str().unwrap_or_default();
    assert!(
        halted.contains("1 host failed (20% of 5 finished; halt at 20%)")
            && halted.contains("1 host that had not taken the job cancelled"),
        "{v}"
    );
    assert_eq!(v["hosts"][5]["state"], "cancelled", "{v}");
    let (_, body) = s.curl(Some("web6"), &[], "/v1/agent/work");
    assert!(body.contains("\"job\": null"), "{body}");
}

/// A host's certificate renews itself before it expires: the stager tells an agent whose
/// certificate has less than a third of `agent_cert_days` left (`renew_identity` in its
/// work), and the agent fetches a new certificate and key and replaces its identity file
/// (0600). Where the file cannot be written the agent says so and keeps its certificate,
/// which still works; the stager mints only for certificates that are due; the old
/// certificate stays valid until it expires; `stager revoke` revokes the renewed one too.
#[test]
fn an_agent_renews_its_certificate_before_it_expires() {
    let w = scratch();
    let s = started(&w);
    let root = w.path().join("root");
    let etc = root.join("etc/reinstall");
    std::fs::create_dir_all(&etc).unwrap();
    let id_file = etc.join("identity.toml");
    ok(stager()
        .args(["enroll", "--dir"])
        .arg(&s.home)
        .args(["web3", "--days", "10", "--out"])
        .arg(&id_file));
    let agent = || {
        run(reinstall()
            .args(["agent", "--root"])
            .arg(&root)
            .arg("--fake-firmware")
            .arg(w.path().join("fw.json"))
            .arg("--work")
            .arg(w.path().join("work"))
            .args(["--wait", "0", "--once"]))
    };
    let id = |p: &std::path::Path| {
        proto::identity::IdentityFile::load(p).unwrap_or_else(|e| panic!("{e}"))
    };
    let old = id(&id_file);
    // curl as an identity file's certificate.
    let as_id = |f: &proto::identity::IdentityFile, tag: &str, args: &[&str], path: &str| {
        let (cert, key) = (
            w.path().join(format!("{tag}.crt")),
            w.path().join(format!("{tag}.key")),
        );
        std::fs::write(&cert, &f.cert).unwrap();
        std::fs::write(&key, &f.key).unwrap();
        let out = sh(&format!(
            "curl -sS -w '\n%{{http_code}}' --cacert {ca} --cert {cert} --key {key} {args} {url}",
            ca = s.pems("alice").ca.display(),
            cert = cert.display(),
            key = key.display(),
            args = args.join(" "),
            url = s.url(path)
        ));
        let (body, code) = out.trim_end().rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse::<u16>().unwrap_or(0), body.to_string())
    };
    let (code, body) = as_id(&old, "old", &[], "/v1/agent/work?wait=0");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""renew_identity": true"#), "{body}");
    // The stager certifies a public key the host made, nothing else: an RSA key or no key is
    // refused, naming the field (and mints nothing).
    let request = |pem: &str, name: &str| {
        let f = w.path().join(name);
        let body = serde_json::json!({ "public_key": pem }).to_string();
        std::fs::write(&f, body).unwrap();
        f
    };
    let pubkey = |genkey: &str| sh(&format!("{genkey} 2>/dev/null | openssl pkey -pubout"));
    let rsa = request(&pubkey("openssl genrsa 2048"), "rsa.json");
    let ec_key = request(
        &pubkey("openssl ecparam -genkey -name prime256v1"),
        "ec.json",
    );
    for (f, want) in [
        (&rsa, "P-256"),
        (&request("x", "x.json"), "not a PEM public key"),
    ] {
        let (code, body) = as_id(
            &old,
            "old",
            &["-X", "POST", "--data-binary", &format!("@{}", f.display())],
            "/v1/agent/identity",
        );
        assert_eq!(code, 400, "{body}");
        assert!(body.contains("public_key") && body.contains(want), "{body}");
    }
    // What the operator sees: web3 runs out within 30 days (and no one else does).
    let certs = |args: &[&str]| -> serde_json::Value {
        let out = ok(stager()
            .args(["certs", "--json", "--dir"])
            .arg(&s.home)
            .args(args));
        serde_json::from_str(&out).unwrap()
    };
    let soon = certs(&["--expiring-within", "30"]);
    assert_eq!(soon.as_array().unwrap().len(), 1, "{soon}");
    assert_eq!(
        (&soon[0]["name"], &soon[0]["standing"]),
        (&"web3".into(), &"current".into())
    );
    assert!(soon[0]["days_left"].as_i64().unwrap() <= 10, "{soon}");
    let expiring = || stager_metric_labelled(&s, r#"stager_identities_expiring{role="agent"}"#);
    assert_eq!(expiring(), 1);

    // The identity file cannot be written: reported, nothing changes, the old one works.
    ok(std::process::Command::new("mount")
        .args(["--bind"])
        .arg(&etc)
        .arg(&etc));
    ok(std::process::Command::new("mount")
        .args(["-o", "remount,bind,ro"])
        .arg(&etc));
    let out = agent();
    umount(&etc);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("renewing this host's certificate failed, the current one stays in use")
            && stderr.contains("Read-only file system"),
        "{stderr}"
    );
    assert_eq!(id(&id_file), old);

    let out = agent();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("this host's certificate was renewed (valid until"),
        "{stderr}"
    );
    let new = id(&id_file);
    assert!(new.cert != old.cert && new.key != old.key);
    assert_eq!(
        (&new.stager, &new.ca, &new.release_pub),
        (&old.stager, &old.ca, &old.release_pub)
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&id_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (code, body) = as_id(&new, "new", &[], "/v1/agent/work?wait=0");
    assert_eq!(code, 200, "{body}");
    assert!(
        !body.contains("renew_identity"),
        "a new certificate is not due: {body}"
    );
    assert_eq!(certs(&["--expiring-within", "30"]), serde_json::json!([]));
    assert_eq!(expiring(), 0);
    // Renewed twice (the read-only attempt minted one the agent could not keep): the
    // latest is current, the others replaced but valid.
    let all = certs(&[]);
    let web3: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"] == "web3")
        .map(|c| c["standing"].as_str().unwrap())
        .collect();
    assert_eq!(web3, ["replaced", "replaced", "current"], "{all}");
    let text = ok(stager().args(["certs", "--dir"]).arg(&s.home));
    assert!(
        text.lines()
            .any(|l| l.starts_with("web3") && l.contains("current")),
        "{text}"
    );
    let out = agent();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("renewed"));
    assert_eq!(id(&id_file), new, "renewed once");
    let (code, body) = as_id(
        &new,
        "new",
        &[
            "-X",
            "POST",
            "--data-binary",
            &format!("@{}", ec_key.display()),
        ],
        "/v1/agent/identity",
    );
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("not due for renewal"), "{body}");
    // Presented after the renewal was last used (a host that did not keep its renewal, or
    // a clone): `revoke --replaced` refuses, naming the time, until the new one is used again.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let (code, _) = as_id(&old, "old", &[], "/v1/agent/work?wait=0");
    assert_eq!(code, 200, "the old certificate works until it expires");
    let replaced = || {
        stager()
            .args(["revoke", "--replaced", "--dir"])
            .arg(&s.home)
            .arg("web3")
            .output()
            .unwrap()
    };
    let out = replaced();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{e}");
    assert!(
        e.contains("presented a replaced certificate") && e.contains("--force"),
        "{e}"
    );
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let (code, _) = as_id(&new, "new", &[], "/v1/agent/work?wait=0");
    assert_eq!(code, 200);
    let out = replaced();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("revoked 2 replaced certificate(s)"), "{said}");
    let (code, body) = as_id(&old, "old", &[], "/v1/agent/work?wait=0");
    assert_eq!(code, 403, "{body}");
    let (code, body) = as_id(&new, "new", &[], "/v1/agent/work?wait=0");
    assert_eq!(code, 200, "the current one is untouched: {body}");
    let text = ok(stager().args(["certs", "--dir"]).arg(&s.home));
    let line = text
        .lines()
        .find(|l| l.starts_with("web3") && l.contains("current"));
    assert!(
        line.is_some_and(|l| l.contains(&db_day())),
        "last used: {text}"
    );

    ok(stager().args(["revoke", "--dir"]).arg(&s.home).arg("web3"));
    for (f, tag) in [(&old, "old"), (&new, "new")] {
        let (code, body) = as_id(f, tag, &[], "/v1/agent/work?wait=0");
        assert_eq!(code, 403, "{tag}: {body}");
    }
}

/// Today, as `state.db` writes times (`2026-11-24T...`).
fn db_day() -> String {
    sh("date -u +%Y-%m-%dT").trim().to_string()
}

/// The stager's own server certificate, whose end would cut every agent off at once: `stager
/// certs` and `/metrics` show it with the rest; `stager server-cert --renew` replaces it for
/// the same names (and new ones); the running stager serves the new one within seconds, and
/// after a restart, and agents reach it as before (they trust the CA, not the certificate).
#[test]
fn the_server_certificate_is_listed_and_renewed_without_touching_the_agents() {
    let w = scratch();
    let mut s = started(&w);
    let json = |args: &[&str]| -> serde_json::Value {
        let out = ok(stager().args(args).arg("--dir").arg(&s.home).arg("--json"));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    };
    let now = json(&["server-cert"]);
    assert!(
        now["sans"]
            .as_array()
            .unwrap()
            .contains(&"127.0.0.1".into()),
        "{now}"
    );
    assert!(now["days_left"].as_i64().unwrap() >= 824, "{now}");
    let all = json(&["certs"]);
    let server: Vec<&serde_json::Value> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["role"] == "server")
        .collect();
    assert_eq!(server.len(), 1, "{all}");
    assert_eq!(
        (&server[0]["standing"], &server[0]["fingerprint"]),
        (&"current".into(), &now["fingerprint"])
    );
    assert_eq!(
        json(&["certs", "--expiring-within", "30"]),
        serde_json::json!([])
    );

    let new = json(&[
        "server-cert",
        "--renew",
        "--days",
        "20",
        "--san",
        "stager.example",
    ]);
    assert_eq!(new["renewed"], true);
    assert!(
        (19..=20).contains(&new["days_left"].as_i64().unwrap()),
        "{new}"
    );
    let sans = new["sans"].as_array().unwrap();
    for want in ["127.0.0.1", "localhost", "stager.example"] {
        assert!(sans.contains(&want.into()), "{want} not in {new}");
    }
    assert_ne!(new["fingerprint"], now["fingerprint"]);
    let soon = json(&["certs", "--expiring-within", "30"]);
    assert_eq!(
        (soon.as_array().unwrap().len(), &soon[0]["role"]),
        (1, &"server".into()),
        "{soon}"
    );
    assert_eq!(
        stager_metric_labelled(&s, r#"stager_identities_expiring{role="server"}"#),
        1
    );

    // No restart: the running stager presents the new certificate within seconds.
    let p = s.pems("web1");
    let port = s.port;
    let served = || {
        let out = sh(&format!(
            "openssl s_client -connect 127.0.0.1:{} -CAfile {} -cert {} -key {} </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256",
            port,
            p.ca.display(),
            p.cert.display(),
            p.key.display()
        ));
        out.trim().rsplit('=').next().unwrap().replace(':', "")
    };
    let want = new["fingerprint"].as_str().unwrap().to_uppercase();
    let t = std::time::Instant::now();
    while served() != want {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(15),
            "the running stager still serves {} 15 s after the renewal, not {want}",
            served()
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let (code, body) = s.curl(Some("web1"), &[], "/v1/agent/work?wait=0");
    assert_eq!(code, 200, "{body}");
    s.kill();
    s.start();
    assert_eq!(served(), want, "and after a restart");
    assert!(s.home.join("server.pem.old").exists() && s.home.join("server.key.old").exists());
    let e = fails(
        stager()
            .args(["server-cert", "--days", "3", "--dir"])
            .arg(&s.home),
    );
    assert!(e.contains("--renew"), "{e}");
}

/// A site relay renews its own certificate, as an agent does: a relay whose certificate has
/// less than a third of `relay_cert_days` left (here: issued for 30 days, against 825) asks
/// at start, makes a new key, and has the stager certify its public half, directly or through
/// the relay above it (which must serve every site of the one below). The new certificate has
/// the same names, both ends of the relay present it without a restart (agents see it; the
/// stager accepts it once the replaced one is revoked), and a relay that is not due, or
/// whose relay above does not serve its site, keeps the one it has.
#[test]
fn a_relay_renews_its_own_certificate_directly_and_through_the_relay_above_it() {
    use integration_tests::stager::Relay;
    let w = scratch();
    let s = started(&w);
    let mut hub = Relay::init_with(&s, "region-eu", &["--site", "pop-a", "--site", "pop-b"]);
    let due = ["--days", "30"];
    let mut pop_a = Relay::init_with(&s, "pop-a", &[&["--site", "pop-a"][..], &due].concat());
    let up = hub.url("");
    let below = |site| [&["--site", site, "--upstream", &up][..], &due].concat();
    let mut pop_b = Relay::init_with(&s, "pop-b", &below("pop-b"));
    let mut pop_c = Relay::init_with(&s, "pop-c", &below("pop-c"));
    for (h, site) in [("web1", "pop-a"), ("web2", "pop-b"), ("web3", "pop-c")] {
        s.enroll_in(h, site);
    }
    let fp = |r: &Relay, f: &str| {
        let out = sh(&format!(
            "openssl x509 -in {} -noout -fingerprint -sha256",
            r.dir.join(f).display()
        ));
        out.trim()
            .rsplit('=')
            .next()
            .unwrap()
            .replace(':', "")
            .to_lowercase()
    };
    let before: Vec<String> = [&pop_a, &pop_b, &pop_c]
        .iter()
        .map(|r| fp(r, "relay.pem"))
        .collect();
    for r in [&mut hub, &mut pop_a, &mut pop_b, &mut pop_c] {
        r.start();
    }
    let serving = |r: &Relay, host: &str| {
        let (code, body) = s.curl_at(&r.url("/healthz"), Some(host), &[]);
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["certificate"].as_str().unwrap().to_string()
    };
    let t = std::time::Instant::now();
    while serving(&pop_a, "web1") == before[0] || serving(&pop_b, "web2") == before[1] {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(20),
            "pop-a and pop-b still serve their first certificates after 20 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let names = |r: &Relay, f: &str| {
        sh(&format!(
            "openssl x509 -in {} -noout -ext subjectAltName,extendedKeyUsage -subject",
            r.dir.join(f).display()
        ))
    };
    for (r, host, old) in [(&pop_a, "web1", &before[0]), (&pop_b, "web2", &before[1])] {
        let new = fp(r, "relay.pem");
        assert_ne!(&new, old);
        assert_eq!(&fp(r, "relay.pem.old"), old);
        assert_eq!(serving(r, host), new);
        assert_eq!(names(r, "relay.pem"), names(r, "relay.pem.old"));
        assert!(names(r, "relay.pem").contains("127.0.0.1"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(r.dir.join("relay.key"))
            .unwrap()
            .permissions();
        assert_eq!(mode.mode() & 0o777, 0o600);
        // What agents see: the new certificate, on a new handshake.
        let p = s.pems(host);
        let seen = sh(&format!(
            "openssl s_client -connect 127.0.0.1:{} -CAfile {} -cert {} -key {} </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256",
            r.port,
            p.ca.display(),
            p.cert.display(),
            p.key.display()
        ));
        assert_eq!(
            seen.trim()
                .rsplit('=')
                .next()
                .unwrap()
                .replace(':', "")
                .to_lowercase(),
            new
        );
    }
    // pop-c is below a relay that does not serve its site: refused, nothing changed.
    assert_eq!(serving(&pop_c, "web3"), before[2]);
    assert_eq!(fp(&pop_c, "relay.pem"), before[2]);
    assert!(!pop_c.dir.join("relay.pem.old").exists());
    // As relay `r` with its current pair (`old`: the one kept as `.old`).
    let as_relay = |r: &Relay, at: &str, old: bool, args: &[&str]| {
        let ext = if old { ".old" } else { "" };
        let (c, k) = (
            r.dir.join(format!("relay.pem{ext}")),
            r.dir.join(format!("relay.key{ext}")),
        );
        let creds = ["--cert", c.to_str().unwrap(), "--key", k.to_str().unwrap()];
        s.curl_at(at, None, &[&creds[..], args].concat())
    };
    let (code, body) = as_relay(&pop_c, &hub.url("/v1/relay/identity"), false, &[]);
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains(r#"relay \"region-eu\" serves site \"pop-a\", \"pop-b\"; relay \"pop-c\" serves site \"pop-c\""#),
        "{body}"
    );

    // The stager's record: the replaced and the current one, for relay_cert_days.
    let out = ok(stager().args(["certs", "--json", "--dir"]).arg(&s.home));
    let certs: serde_json::Value = serde_json::from_str(&out).unwrap();
    let of = |name: &str| -> Vec<(String, i64)> {
        certs
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["name"] == name)
            .map(|c| {
                let standing = c["standing"].as_str().unwrap().to_string();
                (standing, c["days_left"].as_i64().unwrap())
            })
            .collect()
    };
    for name in ["pop-a", "pop-b"] {
        let l = of(name);
        assert_eq!(l.len(), 2, "{name}: {out}");
        assert_eq!(l[0].0, "replaced");
        assert_eq!(l[1].0, "current");
        assert!(l[1].1 >= 824, "{name}: {out}");
    }
    assert_eq!(of("pop-c").len(), 1);

    // Revoking the replaced one: the relay's own requests upstream carry the new one.
    let out = ok(stager()
        .args(["revoke", "--replaced", "--dir"])
        .arg(&s.home)
        .arg("pop-a"));
    assert!(out.contains("revoked 1 replaced certificate(s)"), "{out}");
    let (code, body) = s.curl_at(&pop_a.url("/v1/agent/work?wait=0"), Some("web1"), &[]);
    assert_eq!(code, 200, "{body}");
    let (code, body) = as_relay(&pop_a, &s.url("/v1/relay/identity"), true, &[]);
    assert_eq!(code, 403, "{body}");
    let (code, body) = as_relay(&pop_a, &s.url("/v1/relay/identity"), false, &[]);
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v, serde_json::json!({"renew": false}));
    // Not due now: asking anyway is refused, and a restart renews nothing.
    let ask = format!(
        r#"{{"public_key":{}}}"#,
        serde_json::to_string(&sh(
            "openssl ecparam -name prime256v1 -genkey | openssl ec -pubout 2>/dev/null"
        ))
        .unwrap()
    );
    let (code, body) = as_relay(
        &pop_a,
        &s.url("/v1/relay/identity"),
        false,
        &["-H", "content-type: application/json", "-d", &ask],
    );
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("not due for renewal"), "{body}");
    let now = fp(&pop_a, "relay.pem");
    pop_a.kill();
    pop_a.start();
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(serving(&pop_a, "web1"), now);
    assert_eq!(of("pop-a").len(), 2);

    // Each route to its own kind of certificate.
    let (code, body) = s.curl(Some("web1"), &[], "/v1/relay/identity");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("relay route"), "{body}");
    let (code, body) = as_relay(
        &pop_a,
        &s.url("/v1/agent/identity"),
        false,
        &["-H", "content-type: application/json", "-d", &ask],
    );
    assert_eq!(code, 403, "{body}");
}

/// An age key pair made by the stock `age-keygen`: the identity file and the recipient.
fn age_key(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, String) {
    let f = dir.join(format!("{name}.txt"));
    ok(std::process::Command::new("age-keygen").arg("-o").arg(&f));
    let public = ok(std::process::Command::new("age-keygen").arg("-y").arg(&f));
    (f, public.trim().to_string())
}

/// Hosts web3 (reaching the stager directly) and web4 (through `relay`), each with its own
/// root for the real agent, enrolled with `args` (`--days N`).
struct AgentHosts {
    dir: std::path::PathBuf,
    roots: Vec<(&'static str, std::path::PathBuf)>,
}

impl AgentHosts {
    fn enroll(s: &Stager, relay: &integration_tests::stager::Relay, args: &[&str]) -> AgentHosts {
        let mut roots = Vec::new();
        for (host, via) in [("web3", None), ("web4", Some(relay.url("")))] {
            let root = s.dir.join(format!("root-{host}"));
            let etc = root.join("etc/reinstall");
            std::fs::create_dir_all(&etc).unwrap();
            let mut c = stager();
            c.args(["enroll", "--dir"])
                .arg(&s.home)
                .arg(host)
                .args(args)
                .arg("--out")
                .arg(etc.join("identity.toml"));
            if let Some(v) = &via {
                c.args(["--via", v]);
            }
            ok(&mut c);
            roots.push((host, root));
        }
        AgentHosts {
            dir: s.dir.clone(),
            roots,
        }
    }

    fn identity(&self, i: usize) -> std::path::PathBuf {
        self.roots[i].1.join("etc/reinstall/identity.toml")
    }

    /// One poll of each host's agent (`--once`), which must succeed; their stderr.
    fn poll(&self) -> Vec<String> {
        self.roots
            .iter()
            .map(|(host, root)| {
                let out = run(reinstall()
                    .args(["agent", "--root"])
                    .arg(root)
                    .arg("--fake-firmware")
                    .arg(self.dir.join(format!("fw-{host}.json")))
                    .arg("--work")
                    .arg(self.dir.join(format!("work-{host}")))
                    .args(["--wait", "0", "--once"]));
                let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
                assert!(out.status.success(), "{host}: {stderr}");
                stderr
            })
            .collect()
    }
}

/// The stager's disk is lost: a backup taken while it served (to two operators' age keys)
/// is restored at the same path, and the same agents, operator and blobs carry on with the
/// same certificates. Stock `age | zstd | tar` read the backup; a wrong key, a cut or altered
/// file, a non-empty directory are refused with nothing left behind; `--no-blobs` backups
/// say which bundles they lack.
#[test]
fn the_stager_is_backed_up_while_serving_and_restored_where_it_was_lost() {
    use std::os::unix::fs::PermissionsExt;
    let w = scratch();
    let mut s = started(&w);
    let id = create_job(&s, "web1");
    let d = w.path();
    let keys: Vec<_> = ["key1", "key2", "stranger"]
        .iter()
        .map(|k| age_key(d, k))
        .collect();
    std::fs::write(
        d.join("recipients"),
        format!("# the second\n{}\n", keys[1].1),
    )
    .unwrap();
    let certs = |home: &std::path::Path| -> Vec<String> {
        let out = ok(stager().arg("certs").arg("--dir").arg(home).arg("--json"));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let mut fps: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|c| format!("{} {}", c["name"], c["fingerprint"]))
            .collect();
        fps.sort();
        fps
    };
    let before = certs(&s.home);
    let backup = d.join("stager.backup");
    let home = s.home.clone();
    let backup_cmd = |out: &std::path::Path| {
        let mut c = stager();
        c.arg("backup")
            .arg("--dir")
            .arg(&home)
            .arg("--out")
            .arg(out)
            .args(["-r", &keys[0].1, "--recipients-file"])
            .arg(d.join("recipients"));
        c
    };
    // While serving: the running stager is polled in between.
    let (code, _) = s.curl(Some("web2"), &[], "/v1/agent/work?wait=0");
    assert_eq!(code, 200);
    let made: serde_json::Value =
        serde_json::from_str(&ok(backup_cmd(&backup).arg("--json"))).unwrap();
    let sha = sh(&format!("sha256sum {} | cut -d' ' -f1", backup.display()));
    assert_eq!(made["sha256"], sha.trim(), "{made}");
    assert_eq!(
        (made["bundles"].as_u64(), &made["about"]["blobs"]),
        (Some(2), &true.into()),
        "{made}"
    );
    assert_eq!(
        std::fs::metadata(&backup).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let listing = sh(&format!(
        "age -d -i {} {} | zstd -d | tar -tv",
        keys[1].0.display(),
        backup.display()
    ));
    let target_sha = s.sha_of("target");
    let names: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    for want in [
        "ca.key",
        "release.key",
        "state.db",
        "BACKUP.json",
        &format!("blobs/sha256/{target_sha}"),
    ] {
        assert!(names.contains(&want), "{want} not in:\n{listing}");
    }
    let ca_key = listing.lines().find(|l| l.ends_with(" ca.key")).unwrap();
    assert!(ca_key.starts_with("-rw------- 0/0"), "{ca_key}");
    assert!(!names.iter().any(|n| n.starts_with("tmp")), "{listing}");
    let e = fails(&mut backup_cmd(&backup));
    assert!(e.contains("exists") && e.contains("stager.backup"), "{e}");
    let e = fails(stager().arg("backup").arg("--dir").arg(&s.home).args([
        "--out",
        "/tmp/never-written",
        "-r",
        "age1notakey",
    ]));
    assert!(
        e.contains("--recipient") && e.contains("age1notakey"),
        "{e}"
    );
    let e = fails(&mut backup_cmd(&s.home.join("inside")));
    assert!(e.contains("inside the stager home"), "{e}");

    // Refused, and nothing is left beside the directory named.
    let restore = |file: &std::path::Path, key: &std::path::Path, into: &std::path::Path| {
        let mut c = stager();
        c.arg("restore")
            .arg("--dir")
            .arg(into)
            .arg("-i")
            .arg(key)
            .arg(file);
        c
    };
    let bytes = std::fs::read(&backup).unwrap();
    let cut = d.join("cut.backup");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let flipped = d.join("flipped.backup");
    let mut b = bytes.clone();
    let at = b.len() / 2;
    b[at] ^= 0x20;
    std::fs::write(&flipped, &b).unwrap();
    let nowhere = d.join("restored");
    for (file, key, says) in [
        (&backup, &keys[2].0, "does not open it"),
        (&cut, &keys[0].0, "cut.backup"),
        (&flipped, &keys[0].0, "flipped.backup"),
    ] {
        let e = fails(&mut restore(file, key, &nowhere));
        assert!(e.contains(says), "{says}: {e}");
        assert!(!nowhere.exists(), "{e}");
        let left = sh(&format!("ls -A {} | grep restoring || true", d.display()));
        assert!(left.trim().is_empty(), "left behind: {left}");
    }
    // The drill: restored somewhere temporary, checked, removed.
    let drill = d.join("drill");
    std::fs::create_dir(&drill).unwrap();
    let check = |file: &std::path::Path| {
        let mut c = stager();
        c.env("TMPDIR", &drill)
            .args(["restore", "--check", "-i"])
            .arg(&keys[1].0)
            .arg(file);
        c
    };
    let said = ok(&mut check(&backup));
    assert!(
        said.contains("a whole backup") && said.contains("removed"),
        "{said}"
    );
    let e = fails(&mut check(&flipped));
    assert!(e.contains("flipped.backup"), "{e}");
    assert_eq!(
        std::fs::read_dir(&drill).unwrap().count(),
        0,
        "left in the drill"
    );
    std::fs::create_dir(&nowhere).unwrap();
    std::fs::write(nowhere.join("x"), "").unwrap();
    let e = fails(&mut restore(&backup, &keys[0].0, &nowhere));
    assert!(e.contains("not empty"), "{e}");

    // The disk is lost; the home comes back where it was, and serving carries on.
    s.kill();
    std::fs::rename(&s.home, d.join("lost")).unwrap();
    let r: serde_json::Value =
        serde_json::from_str(&ok(restore(&backup, &keys[0].0, &s.home).arg("--json"))).unwrap();
    assert_eq!(r["missing_blobs"], serde_json::json!([]), "{r}");
    assert_eq!(r["bundles"], 2, "{r}");
    assert_eq!(certs(&s.home), before);
    for (f, mode) in [
        ("ca.key", 0o600),
        ("release.key", 0o600),
        ("server.key", 0o600),
    ] {
        let m = std::fs::metadata(s.home.join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(m & 0o777, mode, "{f}");
    }
    assert!(!s.home.join("BACKUP.json").exists());
    s.start();
    let (code, body) = s.curl(Some("web1"), &[], "/v1/agent/work?wait=0");
    assert_eq!(code, 200, "{body}");
    let work: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(work["job"]["id"], id, "{body}");
    let (code, body) = s.curl(Some("alice"), &[], &format!("/v1/jobs/{id}"));
    assert_eq!(code, 200, "{body}");
    let out = d.join("blob");
    let (code, _) = s.curl(
        Some("web1"),
        &["-o", out.to_str().unwrap()],
        &format!("/v1/blobs/{target_sha}"),
    );
    assert_eq!(code, 200);
    let got = sh(&format!("sha256sum {} | cut -d' ' -f1", out.display()));
    assert_eq!(got.trim(), target_sha);

    // Without blobs: small, and the restore names what it lacks.
    let small = d.join("small.backup");
    ok(backup_cmd(&small).arg("--no-blobs"));
    assert!(std::fs::metadata(&small).unwrap().len() < bytes.len() as u64);
    let again = d.join("again");
    let text = ok(&mut restore(&small, &keys[1].0, &again));
    assert!(
        text.contains("without their blobs") && text.contains("target@1"),
        "{text}"
    );
    assert!(text.contains("not in this backup"), "{text}");
}

/// A stager restored from a backup has no record of the certificates it issued after the
/// backup: hosts that renewed in between (directly, or through a site relay below a regional
/// one), and the site relay that renewed, are taken the first time they present the renewal
/// (the relay's as a relay the request came through), which chains to its CA and names a
/// host or relay on record;
/// a host enrolled after the backup is not (it must be enrolled again).
#[test]
fn certificates_renewed_after_the_backup_are_taken_after_the_restore() {
    let w = scratch();
    let d = w.path();
    let mut s = started(&w);
    use integration_tests::stager::Relay;
    // A site relay below a regional one; the site's is due to renew (30 of 825 days).
    let mut region = Relay::init(&s, "region");
    region.start();
    let mut relay = Relay::init_with(
        &s,
        "pop-a",
        &["--upstream", &region.url(""), "--days", "30"],
    );
    let relay_fp = |r: &Relay| {
        let out = sh(&format!(
            "openssl x509 -in {} -outform der | sha256sum | cut -d' ' -f1",
            r.dir.join("relay.pem").display()
        ));
        out.trim().to_string()
    };
    let first = relay_fp(&relay);
    // web3 reaches the stager directly, web4 through both relays; both are due to renew.
    let hosts = AgentHosts::enroll(&s, &relay, &["--days", "10"]);
    let (key, public) = age_key(d, "key");
    let backup = d.join("stager.backup");
    ok(stager()
        .args(["backup", "--dir"])
        .arg(&s.home)
        .arg("--out")
        .arg(&backup)
        .args(["-r", &public, "--no-blobs"]));

    // After the backup: the site relay renews (at its start, through the regional one), both
    // hosts renew (the real agent), and web5 is enrolled.
    relay.start();
    std::fs::copy(hosts.identity(1), s.identity("web4")).unwrap();
    let serving = || {
        let (code, body) = s.curl_at(&relay.url("/healthz"), Some("web4"), &[]);
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["certificate"].as_str().unwrap().to_string()
    };
    let t = std::time::Instant::now();
    while serving() == first {
        assert!(t.elapsed().as_secs() < 20, "pop-a did not renew in 20 s");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(serving(), relay_fp(&relay));
    for (i, stderr) in hosts.poll().iter().enumerate() {
        assert!(stderr.contains("certificate was renewed"), "{stderr}");
        std::fs::copy(hosts.identity(i), s.identity(hosts.roots[i].0)).unwrap();
    }
    s.enroll("web5");
    let poll = |s: &Stager, host: &str| {
        let url = if host == "web4" {
            relay.url("/v1/agent/work?wait=0")
        } else {
            s.url("/v1/agent/work?wait=0")
        };
        s.curl_at(&url, Some(host), &[])
    };
    for h in ["web3", "web4", "web5"] {
        assert_eq!(poll(&s, h).0, 200, "{h} before the loss");
    }
    // The agent's build is recorded for a host that polls through two relays too.
    let web4 = host_record(&s, "web4");
    assert_eq!(
        web4["agent"],
        format!("reinstall/{}", env!("CARGO_PKG_VERSION")).as_str(),
        "{web4}"
    );

    s.kill();
    std::fs::rename(&s.home, d.join("lost")).unwrap();
    let text = ok(stager()
        .args(["restore", "--dir"])
        .arg(&s.home)
        .arg("-i")
        .arg(&key)
        .arg(&backup));
    assert!(text.contains("taken when first presented"), "{text}");
    s.start();
    let fingerprint = |host: &str| {
        let id = proto::identity::IdentityFile::load(&s.identity(host)).unwrap();
        let der = sh(&format!(
            "printf '%s' '{}' | openssl x509 -outform der | sha256sum | cut -d' ' -f1",
            id.cert
        ));
        der.trim().to_string()
    };
    let on_record = |host: &str| {
        let out = ok(stager().args(["certs", "--json", "--dir"]).arg(&s.home));
        let fp = fingerprint(host);
        out.contains(&fp)
    };
    for h in ["web3", "web4"] {
        assert!(!on_record(h), "{h}'s renewal is not in the backup");
    }
    assert_eq!(stager_metric(&s, "stager_adopted_certificates_total"), 0);
    // web4's request names pop-a's renewed certificate as a relay it came through: taken
    // too, as a renewal of pop-a.
    for h in ["web3", "web4"] {
        let (code, body) = poll(&s, h);
        assert_eq!(code, 200, "{h}: {body}");
        assert!(on_record(h), "{h}'s renewal is on record now");
    }
    assert_eq!(stager_metric(&s, "stager_adopted_certificates_total"), 3);
    let relays = ok(stager().args(["certs", "--json", "--dir"]).arg(&s.home));
    let renewed = relay_fp(&relay);
    assert!(
        relays.contains(&renewed),
        "pop-a's renewal is on record: {relays}"
    );
    let (code, body) = poll(&s, "web5");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("not issued by this stager"), "{body}");
    // Taken once, then on record like any other: a restart changes nothing.
    s.kill();
    s.start();
    for h in ["web3", "web4"] {
        assert_eq!(poll(&s, h).0, 200, "{h} after a restart");
    }
    assert_eq!(stager_metric(&s, "stager_adopted_certificates_total"), 0);
}

/// The CA is replaced under a running stager and relays, in three steps, and nobody is cut
/// off: the real agent (one host direct, one through a site relay below a regional relay)
/// and both relays are given both CAs, then renew onto the new one, then drop the old one; each step is refused while
/// someone would be cut off (hosts that never polled, an operator's identity file issued
/// before the rotation or by the old CA), naming them; a certificate of the retired CA is
/// refused at the handshake.
#[test]
fn the_ca_is_replaced_without_cutting_off_an_agent_or_a_relay() {
    let w = scratch();
    let d = w.path();
    let s = started(&w);
    // A site relay below a regional one: both learn the new CAs, and renew, through the chain.
    let mut region = integration_tests::stager::Relay::init(&s, "region");
    region.start();
    let mut relay =
        integration_tests::stager::Relay::init_with(&s, "pop-a", &["--upstream", &region.url("")]);
    relay.start();
    // A relay asks at start (and hourly): restarted to ask now, the regional one first.
    let restart = |region: &mut integration_tests::stager::Relay,
                   relay: &mut integration_tests::stager::Relay| {
        for r in [region, relay] {
            r.kill();
            r.start();
        }
    };
    let hosts = AgentHosts::enroll(&s, &relay, &[]);
    let first_web3 = std::fs::read_to_string(hosts.identity(0)).unwrap();
    let agents = || hosts.poll();
    let cas_held = |host: usize| {
        let id = proto::identity::IdentityFile::load(&hosts.identity(host)).unwrap();
        id.ca.matches("BEGIN CERTIFICATE").count()
    };
    let relay_cas_files = [region.dir.join("ca.pem"), relay.dir.join("ca.pem")];
    // The CAs both relays hold, if they hold as many.
    let relay_cas = || {
        let n: Vec<usize> = relay_cas_files
            .iter()
            .map(|f| {
                std::fs::read_to_string(f)
                    .unwrap()
                    .matches("BEGIN CERTIFICATE")
                    .count()
            })
            .collect();
        if n[0] == n[1] {
            n[0]
        } else {
            0
        }
    };
    let ca = |args: &[&str]| {
        let mut c = stager();
        c.arg("ca").args(args).arg("--dir").arg(&s.home);
        c
    };
    let status = || -> serde_json::Value {
        serde_json::from_str(&ok(&mut ca(&["status", "--json"]))).unwrap()
    };
    let lacking = |v: &serde_json::Value, key: &str| -> Vec<String> {
        let mut n: Vec<String> = v[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["name"].as_str().unwrap().to_string())
            .collect();
        n.sort();
        n
    };
    // Both ends of every connection re-read their files at most every 2 s.
    let settle = || std::thread::sleep(Duration::from_millis(2500));
    agents();
    assert_eq!(status()["stage"], "one");
    let e = fails(&mut ca(&["switch"]));
    assert!(e.contains("rotate"), "{e}");

    // 1. Rotate: both CAs trusted, given to the agents and the relay.
    let out = ok(&mut ca(&["rotate"]));
    assert!(
        out.contains("made a new CA") && out.contains("next: wait for"),
        "{out}"
    );
    let e = fails(&mut ca(&["rotate"]));
    assert!(e.contains("already"), "{e}");
    // A bundle whose signature is not the release key's (as a relay in the middle would
    // have to send) is refused, and the host keeps what it trusts.
    let sig_file = s.home.join("ca.pem.minisig");
    let good_sig = std::fs::read_to_string(&sig_file).unwrap();
    let lines: Vec<&str> = good_sig.lines().collect();
    let mut forged = lines.clone();
    let other = lines[1].replace(&lines[1][10..14], "AAAA");
    forged[1] = &other;
    let touch = || {
        let pem = std::fs::read(s.home.join("ca.pem")).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        std::fs::write(s.home.join("ca.pem"), pem).unwrap();
        settle();
    };
    std::fs::write(&sig_file, forged.join("\n") + "\n").unwrap();
    touch();
    for (i, err) in agents().iter().enumerate() {
        assert!(
            err.contains("keeping the CA certificates this host trusts"),
            "{err}"
        );
        assert_eq!(cas_held(i), 1);
    }
    std::fs::write(&sig_file, &good_sig).unwrap();
    touch();
    for (i, err) in agents().iter().enumerate() {
        assert!(
            err.contains("trusts the stager's new CA certificates"),
            "{err}"
        );
        assert_eq!(cas_held(i), 2);
    }
    // The next poll says so.
    for err in agents() {
        assert!(!err.contains("trusts"), "{err}");
    }
    restart(&mut region, &mut relay);
    let t = Instant::now();
    while relay_cas() != 2 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the relay kept one CA"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Hosts that never polled, and an operator whose identity file holds the old CA only.
    let st = status();
    assert_eq!(
        lacking(&st, "lacking_bundle"),
        ["alice", "web1", "web2"],
        "{st}"
    );
    let e = fails(&mut ca(&["switch"]));
    assert!(
        e.contains("not switching") && e.contains("web1 (agent, last used never)"),
        "{e}"
    );
    for gone in ["web1", "web2"] {
        ok(stager().args(["revoke", "--dir"]).arg(&s.home).arg(gone));
    }
    std::fs::remove_file(s.identity("alice")).unwrap();
    s.operator("alice", 365);
    assert_eq!(lacking(&status(), "lacking_bundle"), Vec::<String>::new());

    // 2. Switch: the new CA issues; everyone renews onto it, by themselves.
    let out = ok(&mut ca(&["switch"]));
    assert!(out.contains("issues from now on"), "{out}");
    settle();
    let st = status();
    assert_eq!(
        lacking(&st, "old_ca_certificates"),
        ["alice", "pop-a", "region", "web3", "web4"],
        "{st}"
    );
    for err in agents() {
        assert!(err.contains("certificate was renewed"), "{err}");
    }
    restart(&mut region, &mut relay);
    let t = Instant::now();
    while lacking(&status(), "old_ca_certificates") != ["alice"] {
        assert!(t.elapsed() < Duration::from_secs(20), "{}", status());
        std::thread::sleep(Duration::from_millis(300));
    }
    let e = fails(&mut ca(&["retire"]));
    assert!(
        e.contains("not retiring") && e.contains("alice (operator"),
        "{e}"
    );
    // A backup taken between the steps restores with both CA keys checked.
    let (key, public) = age_key(d, "key");
    let mid = d.join("mid.backup");
    ok(stager()
        .args(["backup", "--no-blobs", "--dir"])
        .arg(&s.home)
        .arg("--out")
        .arg(&mid)
        .args(["-r", &public]));
    let said = ok(stager()
        .env("TMPDIR", d)
        .args(["restore", "--check", "-i"])
        .arg(&key)
        .arg(&mid));
    assert!(said.contains("checked"), "{said}");
    std::fs::remove_file(s.identity("alice")).unwrap();
    s.operator("alice", 365);

    // 3. Retire: the old CA is trusted by no one.
    let out = ok(&mut ca(&["retire"]));
    assert!(
        out.contains("no longer trusted") && out.contains("next: nothing under way"),
        "{out}"
    );
    settle();
    for (i, err) in agents().iter().enumerate() {
        assert!(
            err.contains("trusts the stager's new CA certificates"),
            "{err}"
        );
        assert_eq!(cas_held(i), 1);
    }
    restart(&mut region, &mut relay);
    let t = Instant::now();
    while relay_cas() != 1 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the relay kept two CAs"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    settle();
    for (i, err) in agents().iter().enumerate() {
        assert!(!err.contains("trusts") && !err.contains("renewed"), "{err}");
        assert_eq!(cas_held(i), 1);
    }
    let (code, body) = s.curl(Some("alice"), &[], "/v1/jobs");
    assert_eq!(code, 200, "{body}");
    // web3's first certificate (the old CA's) is refused at the handshake now.
    std::fs::write(s.identity("web3"), &first_web3).unwrap();
    let (code, _) = s.curl(Some("web3"), &[], "/v1/agent/work?wait=0");
    assert_eq!(code, 0, "a certificate of the retired CA");
    assert_eq!(status()["stage"], "one");
}

/// `reinstall setup` puts the agent on a machine's running OS: it calls the stager with the
/// host's identity first (one poll: the host is seen), then writes the binary, the identity
/// (0600) and the enabled unit; run again it changes nothing; it refuses, writing nothing, an
/// operator's identity, another host's identity over an installed one, a stager it cannot
/// reach, a revoked identity, and a job under way; the installed identity is kept over the
/// enrolment file (the agent renews into it); the installed tree runs the real agent.
/// `scripts/install-agent`, the fleet's install over SSH, with a stand-in for `ssh` that runs
/// the command on this machine (the VM scenarios run it over real SSH): every host's copy and
/// `reinstall setup` (calling home to the real stager), in parallel, one line per host and a
/// summary; an unreachable host fails alone (exit 1), its error named; run again, nothing to
/// change. A hosts file naming a host without an identity file, or a host twice, is refused
/// before anything is copied (exit 2), naming the file and line.
#[test]
fn install_agent_sets_up_a_fleet_over_ssh_and_names_the_hosts_it_could_not() {
    let w = scratch();
    let d = w.path();
    let s = started(&w);
    s.enroll("web3");
    let ids = d.join("identities");
    std::fs::create_dir_all(&ids).unwrap();
    for h in ["web1", "web2", "web3"] {
        std::fs::copy(s.identity(h), ids.join(format!("{h}.identity.toml"))).unwrap();
    }
    // The stand-ins: `ssh` runs the command here, with a `sudo` that notes what it ran.
    let (ssh, sudo, sudo_log) = (d.join("ssh"), d.join("bin/sudo"), d.join("sudo.log"));
    std::fs::create_dir_all(d.join("bin")).unwrap();
    std::fs::write(
        &ssh,
        format!("#!/bin/bash\n[ \"$1\" = root@web3 ] && {{ echo \"ssh: connect to host web3 port 22: No route to host\" >&2; exit 255; }}\nPATH={}:$PATH exec bash -c \"$2\"\n", d.join("bin").display()),
    )
    .unwrap();
    std::fs::write(
        &sudo,
        format!("#!/bin/bash\n[ \"$1\" = -n ] || {{ echo 'sudo: expected -n' >&2; exit 1; }}\nshift\necho \"$*\" >> {}\nexec \"$@\"\n", sudo_log.display()),
    )
    .unwrap();
    for f in [&ssh, &sudo] {
        std::fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let remote = d.join("remote-tmp");
    std::fs::create_dir_all(&remote).unwrap();
    let root = |h: &str| d.join(format!("root-{h}"));
    let hosts = d.join("hosts");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/install-agent");
    let install = |lines: &str, opts: &[&str]| {
        std::fs::write(&hosts, lines).unwrap();
        let mut c = std::process::Command::new(script);
        c.args(opts)
            .arg("--identities")
            .arg(&ids)
            .arg("--binary")
            .arg(bin("reinstall"))
            .arg("--ssh")
            .arg(&ssh)
            .arg("--remote-dir")
            .arg(&remote)
            .args(["--jobs", "2", "--log"])
            .arg(d.join("log"))
            .arg(&hosts);
        run(&mut c)
    };
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let fleet = format!(
        "# the fleet\nweb1 - --root {}\nweb2 admin@10.0.0.2 --root {}  # by address\n\nweb3\n",
        root("web1").display(),
        root("web2").display()
    );
    let out = install(&fleet, &[]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    for h in ["web1", "web2"] {
        assert!(
            said.lines().any(|l| l.starts_with(&format!("{h} ok in "))
                && l.contains("installed binary, identity, unit")),
            "{said}"
        );
        assert!(root(h).join("usr/local/sbin/reinstall").exists());
        assert_eq!(
            std::fs::read_to_string(root(h).join("etc/reinstall/identity.toml")).unwrap(),
            std::fs::read_to_string(s.identity(h)).unwrap()
        );
        assert!(
            host_record(&s, h)["last_seen"].is_string(),
            "{h} called home"
        );
    }
    assert!(
        said.contains("web3 FAILED: cannot reach root@web3 over SSH (ssh: connect to host web3 port 22: No route to host)"),
        "{said}"
    );
    assert!(said.contains("2 of 3 set up, 1 failed"), "{said}");
    assert_eq!(
        std::fs::read_dir(&remote).unwrap().count(),
        0,
        "the copies are removed"
    );
    assert!(!sudo_log.exists(), "sudo without --sudo");
    // Again: nothing to change. `--json`: the hosts and counts on stdout, the lines on stderr.
    // `--sudo`: setup runs through `sudo -n` (an SSH user that is not root).
    let out = install(&fleet.replace("web3\n", ""), &["--json", "--sudo"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    let sudone = std::fs::read_to_string(&sudo_log).unwrap();
    assert_eq!(
        sudone
            .lines()
            .filter(|l| l.contains("/reinstall setup ") && l.contains(" --json"))
            .count(),
        2,
        "{sudone}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((&v["set_up"], &v["failed"]), (&2.into(), &0.into()), "{v}");
    for h in v["hosts"].as_array().unwrap() {
        assert_eq!(h["ok"], true, "{h}");
        assert_eq!(h["setup"]["binary"][1], "unchanged", "{h}");
        assert!(
            h["line"].as_str().unwrap().contains(": nothing to change;"),
            "{h}"
        );
    }
    assert_eq!(
        String::from_utf8_lossy(&out.stderr)
            .matches(": nothing to change;")
            .count(),
        2,
        "{said}"
    );
    // Refused before anything is copied: no identity file, a host twice.
    std::fs::remove_dir_all(root("web1")).unwrap();
    let out = install(
        &format!("web1 - --root {}\nweb4\n", root("web1").display()),
        &[],
    );
    let said = text(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains(&format!(
            "hosts:2: {}/web4.identity.toml: no identity file for web4",
            ids.display()
        )),
        "{said}"
    );
    assert!(!root("web1").exists(), "nothing set up");
    let out = install("web1\nweb2\nweb1\n", &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("hosts:3: web1 is listed twice"),
        "{}",
        text(&out)
    );
}

#[test]
fn the_agent_is_set_up_on_a_machine_only_once_it_has_called_home() {
    use std::os::unix::fs::PermissionsExt;
    let w = scratch();
    let d = w.path();
    let mut s = started(&w);
    let root = d.join("root-web1");
    let ids: std::collections::HashMap<&str, std::path::PathBuf> =
        ["web1", "web2", "web3", "alice"]
            .into_iter()
            .map(|h| (h, s.identity(h)))
            .collect();
    let setup = |root: &std::path::Path, args: &[&str], id: Option<&str>| {
        let mut c = reinstall();
        c.args(["setup", "--root"]).arg(root).args(args);
        if let Some(h) = id {
            c.arg(&ids[h]);
        }
        c
    };
    let seen = |s: &Stager, h: &str| host_record(s, h)["last_seen"].is_string();
    assert!(!seen(&s, "web1"));
    let id = create_job(&s, "web1");
    let out = ok(&mut setup(&root, &["--json"], Some("web1")));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["host"], "web1");
    assert_eq!(v["checked"]["job"], id, "{out}");
    assert!(
        v["checked"]["url"]
            .as_str()
            .unwrap()
            .starts_with("https://127.0.0.1:"),
        "{out}"
    );
    for f in ["binary", "identity", "unit"] {
        assert_eq!(v[f][1], "written", "{f}: {out}");
    }
    assert_eq!(v["started"], serde_json::Value::Null);
    assert!(seen(&s, "web1"), "the check called home");
    // The stager records the agent's build (its User-Agent) for the host.
    let agent_of = |s: &Stager, h: &str| host_record(s, h)["agent"].clone();
    let build = format!("reinstall/{}", env!("CARGO_PKG_VERSION"));
    assert_eq!(agent_of(&s, "web1"), build.as_str());
    assert_eq!(agent_of(&s, "web2"), serde_json::Value::Null);
    assert_eq!(
        stager_metric_labelled(&s, &format!("stager_hosts_by_agent{{agent=\"{build}\"}}")),
        1
    );
    let status = ok(reinstall()
        .arg("--identity")
        .arg(s.identity("alice"))
        .arg("status"));
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("web1 ") && l.contains(&build)),
        "{status}"
    );
    let bin = root.join("usr/local/sbin/reinstall");
    assert_eq!(
        std::fs::read(&bin).unwrap(),
        std::fs::read(integration_tests::bin("reinstall")).unwrap()
    );
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&bin), 0o755);
    let installed = root.join("etc/reinstall/identity.toml");
    assert_eq!(mode(&installed), 0o600);
    let parse = |p: &std::path::Path| proto::identity::IdentityFile::load(p).unwrap();
    assert_eq!(parse(&installed), parse(&ids["web1"]));
    assert_eq!(
        std::fs::read_to_string(root.join("etc/systemd/system/reinstall-agent.service")).unwrap(),
        agent::engine::AGENT_UNIT
    );
    assert_eq!(
        std::fs::read_link(
            root.join("etc/systemd/system/multi-user.target.wants/reinstall-agent.service")
        )
        .unwrap(),
        std::path::Path::new("/etc/systemd/system/reinstall-agent.service")
    );
    // Again, with and without the file: nothing to change.
    for id in [Some("web1"), None] {
        let out = ok(&mut setup(&root, &[], id));
        assert_eq!(out.matches(": unchanged").count(), 3, "{out}");
        assert!(out.contains("job 1 waits for it"), "{out}");
    }
    // A machine with several candidate disks: the agent's command gets --disk2 by a drop-in;
    // a path that is not a plain /dev name is refused, naming it, and nothing is written.
    let dropin = root.join("etc/systemd/system/reinstall-agent.service.d/50-disk2.conf");
    for bad in ["sdb", "/dev/disk/by-id/a b", "/dev/disk/by-id/x%n"] {
        let e = fails(&mut setup(&root, &["--disk2", bad], None));
        assert!(e.contains(&format!("--disk2 {bad}")), "{e}");
        assert!(!dropin.exists(), "written after: {e}");
    }
    let out = ok(&mut setup(
        &root,
        &[
            "--disk2",
            "/dev/disk/by-id/wwn-0x5000c500a1b2c3d4",
            "--json",
        ],
        None,
    ));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["disk2"][1], "written", "{out}");
    assert_eq!(
        v["ready"],
        serde_json::Value::Null,
        "not the running OS: no plan"
    );
    let text = std::fs::read_to_string(&dropin).unwrap();
    assert!(
        text.lines()
            .all(|l| l.is_empty() || l.starts_with(['#', '[']) || l.starts_with("ExecStart=")),
        "a drop-in of comments, [Service] and ExecStart= lines, none indented: {text}"
    );
    assert!(text.contains("\n[Service]\n"), "{text}");
    assert!(
        text.contains("ExecStart=\nExecStart=/usr/local/sbin/reinstall agent --disk2 /dev/disk/by-id/wwn-0x5000c500a1b2c3d4\n"),
        "{text}"
    );
    let out = ok(&mut setup(
        &root,
        &["--disk2", "/dev/disk/by-id/wwn-0x5000c500a1b2c3d4"],
        None,
    ));
    assert_eq!(out.matches(": unchanged").count(), 4, "{out}");
    // The agent renews into the installed file: the enrolment file given again is not used.
    let mut renewed = parse(&installed);
    renewed.fallback = vec!["https://127.0.0.1:1".into()];
    std::fs::write(&installed, renewed.to_toml()).unwrap();
    let out = ok(&mut setup(&root, &[], Some("web1")));
    assert!(out.contains("kept"), "{out}");
    assert_eq!(parse(&installed), renewed);

    let untouched = |root: &std::path::Path, e: &str| {
        assert!(
            !root.join("etc/reinstall/identity.toml").exists()
                && !root.join("usr/local/sbin/reinstall").exists(),
            "written after: {e}"
        );
    };
    // An operator's identity, and another host's over web1's.
    let e = fails(&mut setup(&d.join("root-a"), &[], Some("alice")));
    assert!(
        e.contains("operator identity") && e.contains("alice"),
        "{e}"
    );
    untouched(&d.join("root-a"), &e);
    let e = fails(&mut setup(&root, &[], Some("web2")));
    assert!(
        e.contains("\"web1\"") && e.contains("\"web2\"") && e.contains("--force"),
        "{e}"
    );
    assert_eq!(parse(&installed), renewed);
    // A revoked identity: refused by the stager, named.
    s.enroll("web3");
    ok(stager().args(["revoke", "--dir"]).arg(&s.home).arg("web3"));
    let e = fails(&mut setup(&d.join("root-web3"), &[], Some("web3")));
    assert!(
        e.contains("could not call home") && e.contains("revoked"),
        "{e}"
    );
    untouched(&d.join("root-web3"), &e);
    // A job under way (a journal in stage-rescue): the agent is not swapped under it.
    let journal = agent::journal::Journal {
        format: agent::journal::FORMAT,
        job: id,
        host: "web1".into(),
        target: proto::v1::BundleRef {
            name: "target".into(),
            version: "1".into(),
            sha256: "0".repeat(64),
            size: 1,
        },
        rescue: proto::v1::BundleRef {
            name: "rescue".into(),
            version: "1".into(),
            sha256: "0".repeat(64),
            size: 1,
        },
        hold_in_rescue: false,
        phase: agent::journal::Phase::StageRescue,
        step: agent::journal::Step::Entering,
        disk1: None,
        disk2: None,
        target_os: None,
        from_rescue: false,
        updated: "2026-11-24T00:00:00Z".into(),
        history: Vec::new(),
    };
    std::fs::create_dir_all(root.join("var/lib/reinstall")).unwrap();
    std::fs::write(
        root.join("var/lib/reinstall/journal.json"),
        serde_json::to_vec(&journal).unwrap(),
    )
    .unwrap();
    let e = fails(&mut setup(&root, &[], None));
    assert!(
        e.contains(&format!("job {id} is under way")) && e.contains("stage-rescue"),
        "{e}"
    );
    std::fs::remove_file(root.join("var/lib/reinstall/journal.json")).unwrap();
    // The stager away: refused, nothing written; --no-check installs anyway.
    s.kill();
    let e = fails(&mut setup(&d.join("root-web2"), &[], Some("web2")));
    assert!(
        e.contains("could not call home") && e.contains("--no-check"),
        "{e}"
    );
    untouched(&d.join("root-web2"), &e);
    ok(&mut setup(
        &d.join("root-web2"),
        &["--no-check"],
        Some("web2"),
    ));
    // The installed tree runs the real agent: with the stager back it takes web2's poll.
    s.start();
    // One poll of the real agent from web2's tree (with `--disk2 D`): what the stager then
    // says of web2's readiness.
    let agent_with = |disk2: Option<&str>| {
        let mut c = reinstall();
        c.args(["agent", "--root"]).arg(d.join("root-web2"));
        if let Some(d2) = disk2 {
            c.args(["--disk2", d2]);
        }
        let out = run(c
            .arg("--fake-firmware")
            .arg(d.join("fw.json"))
            .arg("--work")
            .arg(d.join("work"))
            .args(["--wait", "0", "--once"]));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        host_record(&s, "web2")["ready"].clone()
    };
    agent_with(None);
    assert!(seen(&s, "web2"));

    // At its start in the source OS the agent plans (read only) and tells the stager whether a
    // reinstall would go ahead: a 64 MiB disk 2 is too small (why, on record, in status, in
    // /metrics); a 6 GiB one will do.
    let small = d.join("small.img");
    sh(&format!("truncate -s 64M {}", small.display()));
    let small = integration_tests::attach(&small, 512);
    let r = agent_with(Some(&small.0));
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["why"].as_str().unwrap().contains("too small"), "{r}");
    assert!(r["at"].is_string(), "{r}");
    assert_eq!(stager_metric(&s, "stager_hosts_not_ready"), 1);
    let status = ok(reinstall()
        .arg("--identity")
        .arg(s.identity("alice"))
        .arg("status"));
    assert!(
        status.contains("web2: a reinstall would be refused") && status.contains("too small"),
        "{status}"
    );
    let big = d.join("big.img");
    sh(&format!("truncate -s 6G {}", big.display()));
    let big = integration_tests::attach(&big, 512);
    let r = agent_with(Some(&big.0));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["disk2"], big.0.as_str(), "{r}");
    assert_eq!(stager_metric(&s, "stager_hosts_not_ready"), 0);

    // A running agent plans again while it waits for work (`--ready-every`, an hour by
    // default): the small disk grown to 6 GiB under it shows as ready with no restart.
    struct Running(std::process::Child);
    impl Drop for Running {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _agent = Running(
        reinstall()
            .args(["agent", "--root"])
            .arg(d.join("root-web2"))
            .args(["--disk2", &small.0, "--fake-firmware"])
            .arg(d.join("fw.json"))
            .arg("--work")
            .arg(d.join("work"))
            .args(["--wait", "1", "--ready-every", "1"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let ready_becomes = |ok: bool| {
        let t = Instant::now();
        loop {
            let r = host_record(&s, "web2")["ready"].clone();
            if r["ok"] == ok {
                return r;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "still {r}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let r = ready_becomes(false);
    assert!(r["why"].as_str().unwrap().contains("too small"), "{r}");
    sh(&format!(
        "truncate -s 6G {} && losetup -c {}",
        d.join("small.img").display(),
        small.0
    ));
    let r = ready_becomes(true);
    assert_eq!(r["disk2"], small.0.as_str(), "{r}");
}
