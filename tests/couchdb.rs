//! idemproxy with `--profile couchdb` in front of a real PouchDB Server
//! (CouchDB's HTTP API), started by the test `--in-memory` on its own
//! 127.0.0.1 port and killed by PID at the end. The proxy is set up from the
//! README's recipe alone: `--profile couchdb`, nothing else.
//!
//! A [`FaultProxy`] between idemproxy and the server breaks chosen writes in
//! three ways: it answers `503` itself (the server never sees the write), it
//! resets the connection without forwarding, or it forwards the write and
//! drops the server's answer ("store then drop"). The first two cannot have
//! stored anything; after the third the write is stored and only the answer
//! is lost, and a replay meets CouchDB's `409 conflict`, which the profile
//! verifies with a `GET` of the document.
//!
//! Each test prints one summary line to stderr (past libtest's capture):
//! `profile couchdb: writes=N faults=F (503=A drop=B reset=C) lost=L
//! duplicated=D client_errors=E`, where a write is *lost* when the client got
//! a 2xx and the document is not stored as sent, *duplicated* counts stored
//! documents beyond one per write, and *client_errors* counts answers that
//! were not 2xx (expected in some tests: each says which).
//!
//! Run with `tools/test` (installs pouchdb-server and the venv's
//! `requests`); plain `cargo test` skips these loudly when they are missing.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::Write;
use std::process::Stdio;
use std::sync::Mutex;

use serde_json::{Value, json};
use testkit::fault_proxy::{
    DropAfter, Fault, FaultCounts, FaultPlan, FaultProxy, Faults, FramedRequest, Pick,
};
use testkit::pouchdb::PouchDb;
use testkit::real_servers::{self, parse_lenient};
use testkit::{TestProxy, client, within};

/// PouchDB Server, the fault proxy in front of it, idemproxy in front of that.
struct Setup {
    couch: PouchDb,
    faults: FaultProxy,
    proxy: TestProxy,
}

impl Setup {
    /// Starts the three, creating `dbs` first (straight on the server).
    async fn start(dbs: &[&str], plan: FaultPlan, faults: Faults) -> Option<Setup> {
        let couch = PouchDb::start().await?;
        for db in dbs {
            couch.create_db(db).await;
        }
        let faults = FaultProxy::start_with(&couch.url(), plan, faults).await;
        // The README's recipe: the profile alone.
        let proxy = TestProxy::start(&faults.url(), &["--profile", "couchdb"]).await;
        Some(Setup {
            couch,
            faults,
            proxy,
        })
    }

    /// `METHOD path` with a JSON body through idemproxy.
    async fn send(&self, method: &str, path: &str, body: &Value) -> Answer {
        let url = self.proxy.url(path);
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let resp = within(
            &format!("{method} {path} through the proxy"),
            client()
                .request(m, &url)
                .header("content-type", "application/json")
                .body(body.to_string())
                .send(),
        )
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        let recovered = header("x-idemproxy-recovered");
        let attempts = header("x-idemproxy-attempts").map_or(1, |v| v.parse().unwrap());
        let status = resp.status().as_u16();
        let text = within("response body", resp.text()).await.unwrap();
        Answer {
            status,
            recovered,
            attempts,
            body: parse_lenient(&text),
        }
    }
}

/// What the client got.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// `x-idemproxy-recovered`.
    recovered: Option<String>,
    /// `x-idemproxy-attempts` (1 when absent).
    attempts: u32,
    body: Value,
}

/// Matches the requests for which `which` holds, each the first time only
/// (the same request line and body again, a replay, goes through unharmed).
fn first_attempts(
    which: impl Fn(&FramedRequest) -> bool + Send + Sync + 'static,
) -> Box<dyn Fn(&FramedRequest) -> bool + Send + Sync> {
    let seen = Mutex::new(HashSet::new());
    Box::new(move |req| {
        which(req)
            && seen
                .lock()
                .unwrap()
                .insert((req.request_line().to_owned(), req.body.clone()))
    })
}

/// The document id a create or update names: the second path segment, or
/// the body's `_id` for a `POST /{db}`.
fn doc_id(req: &FramedRequest) -> String {
    let target = req.request_line().split(' ').nth(1).unwrap_or("");
    let path = target.split('?').next().unwrap();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    if segments.len() >= 2 {
        segments[1].to_owned()
    } else {
        req.json()
            .and_then(|doc| doc["_id"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

/// Whether the stored document holds exactly what was sent (plus `_id`, `_rev`).
fn stored_as_sent(stored: &Value, sent: &Value) -> bool {
    let (Some(stored), Some(sent)) = (stored.as_object(), sent.as_object()) else {
        return false;
    };
    let mut stored = stored.clone();
    stored.remove("_id");
    stored.remove("_rev");
    let mut sent = sent.clone();
    sent.remove("_id");
    sent.remove("_rev");
    stored == sent
}

/// Prints the scenario's summary line to stderr, past libtest's capture.
fn summary(
    writes: usize,
    faults: FaultCounts,
    lost: usize,
    duplicated: usize,
    client_errors: usize,
) {
    let line = format!(
        "profile couchdb: writes={writes} faults={faults} lost={lost} \
         duplicated={duplicated} client_errors={client_errors}"
    );
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// 60 document creates (45 `PUT /writes/{id}`, 15 `POST /writes` with an `_id`), 30% of the attempts
/// broken by a 503, a store-then-drop or a reset in turn: every create ends 201 (a dropped one recovered from
/// its replay's 409, with the stored `rev`), every document is stored once, as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_survive_503s_resets_and_dropped_answers() {
    const WRITES: usize = 60;
    let plan = FaultPlan {
        matches: Box::new(|req| {
            let line = req.request_line();
            line.starts_with("PUT /writes/") || line.starts_with("POST /writes ")
        }),
        // Seeded: the same attempts are broken on every run (the writes are
        // sent one after the other): 21 faults, 7 of each kind, four writes
        // broken more than once (two of them three times in a row).
        pick: Pick::Chance {
            probability: 0.3,
            seed: 1,
        },
        drop_after: DropAfter::FirstByte,
    };
    let rotation = Faults::Rotate(vec![Fault::Unavailable, Fault::StoreThenDrop, Fault::Reset]);
    let Some(s) = Setup::start(&["writes"], plan, rotation).await else {
        return;
    };

    // (id, method, path, body); every fourth a POST with an _id.
    let writes: Vec<(String, &str, String, Value)> = (0..WRITES)
        .map(|i| {
            if i % 4 == 3 {
                let id = format!("post-{i:02}");
                let body = json!({"_id": id, "n": i, "kind": "post", "tags": ["a", "b"]});
                (id, "POST", "/writes".to_owned(), body)
            } else {
                let id = format!("doc-{i:02}");
                let body = json!({"n": i, "kind": "put", "nested": {"x": [1, 2, i]}});
                let path = format!("/writes/{id}");
                (id, "PUT", path, body)
            }
        })
        .collect();

    let mut answers = BTreeMap::new();
    for (id, method, path, body) in &writes {
        let answer = s.send(method, path, body).await;
        answers.insert(id.clone(), answer);
    }

    // The faults, by document.
    let injected = s.faults.injected();
    let counts = s.faults.counts();
    let mut faults_of: BTreeMap<String, Vec<Fault>> = BTreeMap::new();
    for i in &injected {
        faults_of
            .entry(doc_id(&i.request))
            .or_default()
            .push(i.fault);
    }
    let dropped_ids: BTreeSet<String> = faults_of
        .iter()
        .filter(|(_, f)| f.contains(&Fault::StoreThenDrop))
        .map(|(id, _)| id.clone())
        .collect();
    assert!(
        s.faults.dropped().iter().all(|d| d.answered),
        "a dropped write that the server did not answer: {:?}",
        s.faults.dropped()
    );

    let stored: BTreeMap<String, Value> = s
        .couch
        .all_docs("writes")
        .await
        .into_iter()
        .map(|doc| (doc["_id"].as_str().unwrap().to_owned(), doc))
        .collect();

    let (mut lost, mut client_errors, mut recovered) = (0, 0, BTreeSet::new());
    let mut problems = Vec::new();
    for (id, method, _, body) in &writes {
        let a = &answers[id];
        let doc = stored.get(id);
        let faults = faults_of.get(id).map_or(&[][..], Vec::as_slice);
        if !(200..300).contains(&a.status) {
            client_errors += 1;
            problems.push(format!(
                "{method} {id}: {} {} (faults {faults:?})",
                a.status, a.body
            ));
            continue;
        }
        let Some(doc) = doc.filter(|d| stored_as_sent(d, body)) else {
            lost += 1;
            problems.push(format!(
                "{method} {id}: answered {}, stored {doc:?}",
                a.status
            ));
            continue;
        };
        // A first-time success and a recovered one look the same: CouchDB's create answer.
        let rev = doc["_rev"].as_str().unwrap();
        let expected = json!({"ok": true, "id": id, "rev": rev});
        if a.status != 201 || a.body != expected {
            problems.push(format!(
                "{method} {id}: {} {} (want 201 {expected}; faults {faults:?})",
                a.status, a.body
            ));
        }
        if !rev.starts_with("1-") {
            problems.push(format!("{method} {id}: stored rev {rev}: written twice?"));
        }
        if let Some(how) = &a.recovered {
            assert_eq!(how, "409", "{id}");
            recovered.insert(id.clone());
        }
        // One attempt per fault, then the one that got through.
        if a.attempts as usize != faults.len() + 1 {
            problems.push(format!(
                "{method} {id}: {} attempts for faults {faults:?}",
                a.attempts
            ));
        }
    }
    // The ids are the client's: a write stored twice shows as a document of another id.
    let written: BTreeSet<&String> = writes.iter().map(|(id, ..)| id).collect();
    let duplicated = stored.keys().filter(|id| !written.contains(id)).count();
    summary(WRITES, counts, lost, duplicated, client_errors);

    assert!(problems.is_empty(), "{problems:#?}");
    assert_eq!(
        (lost, duplicated, client_errors),
        (0, 0, 0),
        "{problems:#?}"
    );
    assert_eq!(
        stored.len(),
        WRITES,
        "documents stored: {:?}",
        stored.keys()
    );
    // Exactly the writes whose answer was dropped needed the 409 recovery.
    assert_eq!(recovered, dropped_ids, "recovered vs dropped");
    // All three kinds happened, to PUTs and POSTs alike.
    assert!(
        counts.unavailable >= 3 && counts.store_then_drop >= 3 && counts.reset >= 3,
        "{counts}"
    );
    assert!(
        dropped_ids.iter().any(|id| id.starts_with("post-"))
            && dropped_ids.iter().any(|id| id.starts_with("doc-")),
        "dropped: {dropped_ids:?}"
    );
}

/// `POST /anon` without an `_id` (the server picks the id): a dropped answer is not replayed (502
/// `may_have_been_processed: true`, one document stored), nor is a reset (502, nothing stored); a 503 is (201).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_without_id_is_never_replayed_once_sent() {
    let plan = FaultPlan {
        matches: first_attempts(|req| req.request_line().starts_with("POST /anon ")),
        pick: Pick::Always,
        drop_after: DropAfter::FirstByte,
    };
    // The body's "case" names the fault of its first attempt.
    let by_case = Faults::Each(Box::new(
        |req, _| match req.json().unwrap_or_default()["case"].as_str() {
            Some("reset") => Fault::Reset,
            Some("503") => Fault::Unavailable,
            _ => Fault::StoreThenDrop,
        },
    ));
    let Some(s) = Setup::start(&["anon"], plan, by_case).await else {
        return;
    };
    let mut answers = Vec::new();
    for case in ["drop", "reset", "503"] {
        let a = s.send("POST", "/anon", &json!({"case": case})).await;
        answers.push((case, a));
    }
    let docs = s.couch.all_docs("anon").await;
    let stored = |case: &str| docs.iter().filter(|d| d["case"] == case).count();
    let (drop_answer, reset_answer, unavailable_answer) =
        (&answers[0].1, &answers[1].1, &answers[2].1);

    let client_errors = answers
        .iter()
        .filter(|(_, a)| !(200..300).contains(&a.status))
        .count();
    let lost = answers
        .iter()
        .filter(|(case, a)| (200..300).contains(&a.status) && stored(case) == 0)
        .count();
    let duplicated: usize = ["drop", "reset", "503"]
        .iter()
        .map(|c| stored(c).saturating_sub(1))
        .sum();
    // Expected: the drop and the reset reach the client as 502s.
    summary(3, s.faults.counts(), lost, duplicated, client_errors);

    // Stored then dropped: the server created a document; the client is told to check first.
    assert_eq!(drop_answer.status, 502, "{drop_answer:?}");
    assert_eq!(
        drop_answer.body["may_have_been_processed"], true,
        "{drop_answer:?}"
    );
    assert_eq!(drop_answer.attempts, 1, "{drop_answer:?}");
    assert_eq!(stored("drop"), 1, "{docs:?}");
    // Reset before forwarding: nothing stored, but the proxy cannot know; same answer.
    assert_eq!(reset_answer.status, 502, "{reset_answer:?}");
    assert_eq!(
        reset_answer.body["may_have_been_processed"], true,
        "{reset_answer:?}"
    );
    assert_eq!(reset_answer.attempts, 1, "{reset_answer:?}");
    assert_eq!(stored("reset"), 0, "{docs:?}");
    // A 503 says "not handled": retried, stored once.
    assert_eq!(unavailable_answer.status, 201, "{unavailable_answer:?}");
    assert_eq!(unavailable_answer.attempts, 2, "{unavailable_answer:?}");
    assert_eq!(
        unavailable_answer.body["ok"], true,
        "{unavailable_answer:?}"
    );
    assert_eq!(stored("503"), 1, "{docs:?}");
    assert_eq!(docs.len(), 2, "{docs:?}");
    // What reached the server: the dropped POST, and the 503'd one's retry.
    assert_eq!(s.faults.count_lines("POST /anon "), 2);
    assert_eq!(
        s.faults.counts(),
        FaultCounts {
            unavailable: 1,
            store_then_drop: 1,
            reset: 1
        }
    );
    assert_eq!((lost, duplicated, client_errors), (0, 0, 2));
}

/// Updates that carry the current `_rev` (in the body, or `?rev=`), each first attempt broken: after a 503 or a
/// reset the replay succeeds (201); after a dropped answer the replay meets CouchDB's 409, which the profile
/// does not recover (a `_rev` is present), so the client sees the 409 although its update was stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_with_rev_is_not_replayed_once_it_may_have_been_stored() {
    // (document, the fault of its update's first attempt, `_rev` in the query).
    const CASES: [(&str, Fault, bool); 4] = [
        ("body-drop", Fault::StoreThenDrop, false),
        ("query-drop", Fault::StoreThenDrop, true),
        ("body-503", Fault::Unavailable, false),
        ("body-reset", Fault::Reset, false),
    ];
    let plan = FaultPlan {
        matches: first_attempts(|req| req.request_line().starts_with("PUT /updates/")),
        pick: Pick::Always,
        drop_after: DropAfter::FirstByte,
    };
    let by_doc = Faults::Each(Box::new(|req, _| {
        let id = doc_id(req);
        CASES
            .iter()
            .find(|(doc, _, _)| *doc == id)
            .map_or(Fault::StoreThenDrop, |(_, fault, _)| *fault)
    }));
    let Some(s) = Setup::start(&["updates"], plan, by_doc).await else {
        return;
    };

    let mut client_errors = 0;
    let mut lost = 0;
    for (id, fault, in_query) in CASES {
        // Created straight on the server, then updated through the proxy.
        let (status, created) = s
            .couch
            .call("PUT", &format!("/updates/{id}"), Some(&json!({"v": 1})))
            .await;
        assert_eq!(status, 201, "{created}");
        let rev1 = created["rev"].as_str().unwrap().to_owned();
        let (path, body) = if in_query {
            (format!("/updates/{id}?rev={rev1}"), json!({"v": 2}))
        } else {
            (format!("/updates/{id}"), json!({"_rev": rev1, "v": 2}))
        };
        let a = s.send("PUT", &path, &body).await;
        let (_, stored) = s.couch.get(&format!("/updates/{id}")).await;
        let stored_rev = stored["_rev"].as_str().unwrap();
        let acknowledged = (200..300).contains(&a.status);
        if acknowledged && stored["v"] != 2 {
            lost += 1;
        }
        if !acknowledged {
            client_errors += 1;
        }
        // Stored once, or (reset before it was forwarded) not at all.
        if fault == Fault::Reset {
            assert_eq!(stored["v"], 1, "{id}: {stored}");
            assert!(stored_rev.starts_with("1-"), "{id}: {stored}");
        } else {
            assert_eq!(stored["v"], 2, "{id}: {stored}");
            assert!(stored_rev.starts_with("2-"), "{id}: {stored}");
        }
        assert_eq!(a.recovered, None, "{id}: {a:?}");
        match fault {
            Fault::StoreThenDrop | Fault::Reset => {
                // Sent, and perhaps stored (here: stored after a drop, not
                // after a reset before forwarding, which the proxy cannot
                // tell apart): not replayed, and the client is told so
                // instead of getting a conflict it might resolve by applying
                // its change again.
                assert_eq!(a.status, 502, "{id}: {a:?}");
                assert_eq!(a.attempts, 1, "{id}: {a:?}");
                assert_eq!(a.body["may_have_been_processed"], true, "{id}: {a:?}");
            }
            Fault::Unavailable => {
                assert_eq!(a.attempts, 2, "{id}: {a:?}");
                assert_eq!(a.status, 201, "{id}: {a:?}");
                assert_eq!(
                    a.body,
                    json!({"ok": true, "id": id, "rev": stored_rev}),
                    "{id}"
                );
            }
        }
    }
    let docs = s.couch.all_docs("updates").await;
    let duplicated = docs.len().saturating_sub(CASES.len());
    // Expected: the drop and the reset reach the client as 502s that say the
    // update may have been stored.
    summary(
        CASES.len(),
        s.faults.counts(),
        lost,
        duplicated,
        client_errors,
    );
    assert_eq!(
        s.faults.counts(),
        FaultCounts {
            unavailable: 1,
            store_then_drop: 2,
            reset: 1
        }
    );
    assert_eq!((lost, duplicated, client_errors), (0, 0, 3));
}

/// The client side of [`a_recovered_create_parses_like_a_first_time_success`]:
/// Python `requests` against the proxy (argv[1]). Prints one JSON line.
const REQUESTS_CLIENT: &str = r#"
import json, sys
import requests

base = sys.argv[1]
out = []

def check(r, doc_id):
    assert r.status_code == 201, (doc_id, r.status_code, r.text)
    body = r.json()
    assert body["ok"] is True, body
    assert body["id"] == doc_id, body
    assert isinstance(body.get("rev"), str) and body["rev"], body
    out.append({
        "id": doc_id,
        "rev": body["rev"],
        "recovered": r.headers.get("x-idemproxy-recovered"),
        "headers": {k.lower(): v for k, v in r.headers.items()},
    })

with requests.Session() as http:
    check(http.put(f"{base}/py/put-by-requests", json={"client": "requests", "n": 1}, timeout=10), "put-by-requests")
    check(http.post(f"{base}/py", json={"_id": "post-by-requests", "client": "requests"}, timeout=10), "post-by-requests")
    # A first-time success, no fault: for comparing the headers.
    check(http.put(f"{base}/py/first-time", json={"client": "requests", "n": 2}, timeout=10), "first-time")
print(json.dumps(out))
"#;

/// A create whose first answer is dropped, sent with Python's `requests` (PUT, and POST with an `_id`): the
/// recovered answer is a 201 whose JSON has `ok: true`, the `id` and the stored `rev`, as a first-time success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovered_create_parses_like_a_first_time_success() {
    let python = real_servers::venv_python();
    let check = std::process::Command::new(&python)
        .args(["-c", "import requests"])
        .stdin(Stdio::null())
        .output();
    if !check.as_ref().is_ok_and(|o| o.status.success()) {
        let why = match &check {
            Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_owned(),
            Err(e) => format!("{}: {e}", python.display()),
        };
        assert!(
            !real_servers::required(),
            "Python requests is required (TEST_REAL_SERVERS=required) but not available: {why}. \
             Run tools/test, which installs it."
        );
        let _ = writeln!(
            std::io::stderr(),
            "\nSKIPPED a_recovered_create_parses_like_a_first_time_success: \
             no Python requests ({why}); run tools/test\n"
        );
        return;
    }
    let plan = FaultPlan {
        matches: first_attempts(|req| {
            let line = req.request_line();
            line.starts_with("PUT /py/put-by-requests ") || line.starts_with("POST /py ")
        }),
        pick: Pick::Always,
        drop_after: DropAfter::FirstByte,
    };
    let Some(s) = Setup::start(&["py"], plan, Faults::One(Fault::StoreThenDrop)).await else {
        return;
    };
    let mut cmd = tokio::process::Command::new(&python);
    cmd.args(["-c", REQUESTS_CLIENT, &s.proxy.url("")])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("NO_PROXY", "127.0.0.1")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = within("the requests client", cmd.output())
        .await
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the requests client failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<Value> =
        serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("the client's JSON line");
    assert_eq!(results.len(), 3, "{results:?}");

    let mut lost = 0;
    for r in &results {
        let id = r["id"].as_str().unwrap();
        let (status, stored) = s.couch.get(&format!("/py/{id}")).await;
        if status != 200 {
            lost += 1;
        }
        assert_eq!(
            r["rev"], stored["_rev"],
            "{id}: the answer's rev is the stored one"
        );
        let want = (id != "first-time").then_some("409");
        assert_eq!(r["recovered"].as_str(), want, "{id}: {r}");
    }
    let docs = s.couch.all_docs("py").await;
    summary(3, s.faults.counts(), lost, docs.len().saturating_sub(3), 0);
    assert_eq!(s.faults.counts().store_then_drop, 2);
    assert_eq!(docs.len(), 3, "{docs:?}");
    assert_eq!(lost, 0);
    // How the recovered answers' headers differ from a first-time create's
    // (not asserted: CouchDB clients read the body; noted for the record).
    let first = &results[2]["headers"];
    for r in &results[..2] {
        let got = &r["headers"];
        let mut notes = Vec::new();
        for name in ["etag", "location", "content-type"] {
            if got[name] != first[name] {
                notes.push(format!(
                    "{name} {} (first-time: {})",
                    got[name], first[name]
                ));
            }
        }
        let _ = writeln!(
            std::io::stderr(),
            "note: profile couchdb: recovered {}: {}",
            r["id"],
            if notes.is_empty() {
                "headers as a first-time create".to_owned()
            } else {
                notes.join(", ")
            }
        );
    }
}
