//! The `azure-table` and `azure-blob-lease` profiles against Azurite 3.35
//! (the Azure Storage emulator), started by the tests on their own
//! 127.0.0.1 ports and killed by PID at the end. idemproxy runs with
//! `--profile azure-table` / `--profile azure-blob-lease` and nothing else
//! but short backoffs; a [`FaultProxy`] between idemproxy and Azurite
//! injects faults and taps the wire.
//!
//! - Table: entity inserts through 503s, stored-then-dropped answers and
//!   resets all end 2xx for the client, none lost, none doubled; a
//!   recovered one looks like Azure's own first answer (201 with the
//!   entity, or 204 under `Prefer: return-no-content`). With an add-only
//!   SAS the verification cannot read, and the 409 passes through. The
//!   official `azure-data-tables` SDK sees a dropped insert succeed (it
//!   annotates every string and double with `@odata.type`, which no read of
//!   the entity returns: the profile's `match-ignore=*@odata.type` leaves
//!   them out of the comparison).
//! - Blob lease: an acquire with `x-ms-lease-duration: 15` is renewed every
//!   third of that (learned from the header), for a silent and a busy client
//!   alike, past the duration; `release` stops the renewals, and so does a
//!   `change` for the old id (the client renews the new one). An acquire
//!   without a proposed id is not replayed after a lost answer, one with a
//!   proposed id is (and so is the `azure-storage-blob` SDK's).
//!
//! Leases last at least 15 s on Azurite's wall clock, so the lease test runs
//! its three clients at once and takes about 17 s; the rest run alongside.
//! Run with `tools/test` (installs Azurite and the SDKs); a plain
//! `cargo test` skips these loudly when Azurite is missing.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use serde_json::{Value, json};
use testkit::azurite::{self, ACCOUNT, Azurite};
use testkit::fault_proxy::{DropAfter, Fault, FaultPlan, FaultProxy, Faults, FramedRequest, Pick};
use testkit::{TestProxy, admin_sessions, client, metric_sum, metric_value, within};

/// The `x-ms-version` the tests' own requests send.
const VERSION: &str = "2021-08-06";
/// Table requests must say what they accept (else 415); nometadata is the
/// plainest JSON.
const NOMETADATA: &str = "application/json;odata=nometadata";
/// Flags besides the profile: short backoffs, so that retries are quick.
const FAST_RETRIES: &[&str] = &["--backoff-base", "10ms", "--backoff-max", "100ms"];

/// A response read in full.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

async fn send(what: &str, req: reqwest::RequestBuilder) -> Reply {
    within(what, async {
        let resp = req.send().await.unwrap_or_else(|e| panic!("{what}: {e}"));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.text().await.unwrap_or_default();
        Reply {
            status,
            headers,
            body,
        }
    })
    .await
}

/// Every field of `sent` is in `stored` with the same value.
fn assert_subset(sent: &Value, stored: &Value, what: &str) {
    for (k, v) in sent.as_object().expect("an object") {
        assert_eq!(stored.get(k), Some(v), "{what}: field {k} in {stored}");
    }
}

/// Prints a summary line to stderr, past libtest's capture (so that it
/// shows in a passing run too).
fn summary(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

// ---------------------------------------------------------------------------
// Azure Table
// ---------------------------------------------------------------------------

/// Azurite's table service, a fault proxy in front of it, idemproxy with
/// `--profile azure-table` in front of that, and one table.
struct TableSetup {
    azurite: Azurite,
    faults: FaultProxy,
    proxy: TestProxy,
    table: String,
}

impl TableSetup {
    async fn start(table: &str, plan: FaultPlan, faults: Faults) -> Option<TableSetup> {
        let azurite = Azurite::table().await?;
        // Created straight at Azurite: a table SAS cannot create its table.
        let create = send(
            "create the table",
            client()
                .post(format!(
                    "{}/Tables?{}",
                    azurite.account_url(),
                    azurite::account_sas("t", "sco", "rwdlacu")
                ))
                .header("accept", NOMETADATA)
                .header("content-type", "application/json")
                .body(json!({"TableName": table}).to_string()),
        )
        .await;
        assert_eq!(create.status, 201, "create table: {create:?}");
        let faults = FaultProxy::start_with(&azurite.url(), plan, faults).await;
        let mut flags = vec!["--profile", "azure-table"];
        flags.extend_from_slice(FAST_RETRIES);
        let proxy = TestProxy::start(&faults.url(), &flags).await;
        Some(TableSetup {
            azurite,
            faults,
            proxy,
            table: table.to_owned(),
        })
    }

    /// `POST /devstoreaccount1/{table}?{sas}` through the proxy.
    async fn insert(&self, entity: &Value, sas: &str, no_content: bool) -> Reply {
        let mut req = client()
            .post(self.proxy.url(&format!("/{ACCOUNT}/{}?{sas}", self.table)))
            .header("accept", NOMETADATA)
            .header("content-type", "application/json")
            .header("x-ms-version", VERSION)
            .body(entity.to_string());
        if no_content {
            req = req.header("prefer", "return-no-content");
        }
        send("insert an entity through the proxy", req).await
    }

    /// Every entity of the table, straight from Azurite.
    async fn entities(&self) -> Vec<Value> {
        let sas = azurite::table_sas(&self.table, "r");
        let reply = send(
            "query the table",
            client()
                .get(format!(
                    "{}/{}()?{sas}",
                    self.azurite.account_url(),
                    self.table
                ))
                .header("accept", NOMETADATA)
                .header("x-ms-version", VERSION),
        )
        .await;
        assert_eq!(reply.status, 200, "query: {reply:?}");
        assert!(
            reply.header("x-ms-continuation-nextpartitionkey").is_none(),
            "the query has more pages"
        );
        reply.json()["value"]
            .as_array()
            .expect("a value array")
            .clone()
    }

    /// Inserts (POSTs) of row key `rk` that reached Azurite.
    fn inserts_reaching_azurite(&self, rk: &str) -> usize {
        self.faults
            .requests()
            .iter()
            .filter(|r| r.request_line().starts_with("POST "))
            .filter(|r| r.json().is_some_and(|j| j["RowKey"] == rk))
            .count()
    }
}

/// The row key of entity `i`.
fn row_key(i: usize) -> String {
    format!("rk-{i:03}")
}

/// The index `i` of the entity a request is about: from the JSON body of an
/// insert, from the entity URL of a read.
fn entity_index(req: &FramedRequest) -> Option<usize> {
    let text = match req.json() {
        Some(doc) => doc["RowKey"].as_str()?.to_owned(),
        None => req.request_line().to_owned(),
    };
    let at = text.find("rk-")? + 3;
    text.get(at..at + 3)?.parse().ok()
}

/// The workload's faults, by entity: the first attempt of insert `i` gets a
/// 503 (`i % 6 == 0`), is stored then dropped (`i % 6 == 2`) or reset
/// (`i % 6 == 4`); the first verification read of a dropped one with
/// `i % 12 == 8` is reset too.
fn insert_fault(i: usize) -> Option<Fault> {
    match i % 6 {
        0 => Some(Fault::Unavailable),
        2 => Some(Fault::StoreThenDrop),
        4 => Some(Fault::Reset),
        _ => None,
    }
}

fn read_fault(i: usize) -> Option<Fault> {
    (i % 12 == 8).then_some(Fault::Reset)
}

/// Entity inserts through 503s, stored-then-dropped answers and resets:
/// every insert ends 2xx for the client, a recovered one as Azure answers
/// a first insert (201 with the entity, 204 with no body under
/// `Prefer: return-no-content`); every entity is stored once, as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_inserts_through_faults_are_neither_lost_nor_duplicated() {
    const N: usize = 48;
    const WORKERS: usize = 4;
    // The first attempt of each faulted request only (the replays go through).
    let seen = Mutex::new(HashSet::new());
    let plan = FaultPlan {
        matches: Box::new(move |req| {
            let Some(i) = entity_index(req) else {
                return false;
            };
            let method = req
                .request_line()
                .split(' ')
                .next()
                .unwrap_or("")
                .to_owned();
            let fault = match method.as_str() {
                "POST" => insert_fault(i),
                "GET" => read_fault(i),
                _ => None,
            };
            fault.is_some() && seen.lock().unwrap().insert((method, i))
        }),
        pick: Pick::Always,
        drop_after: DropAfter::FirstByte,
    };
    let faults = Faults::Each(Box::new(|req, _| {
        let i = entity_index(req).expect("a matched request names its entity");
        if req.request_line().starts_with("GET ") {
            read_fault(i).unwrap()
        } else {
            insert_fault(i).unwrap()
        }
    }));
    let Some(s) = TableSetup::start("sessions", plan, faults).await else {
        return;
    };
    let sas = azurite::table_sas("sessions", "raud");
    let entity = |i: usize| {
        json!({
            "PartitionKey": format!("agent-{}", i % 3),
            "RowKey": row_key(i),
            "turn": i,
            "text": format!("entry {i}: héllo, \"quoted\" & 'single'"),
            "final": i % 2 == 0,
            "score": 0.5 + i as f64,
        })
    };
    // Under `Prefer: return-no-content`: a quarter, dropped ones among them.
    let no_content = |i: usize| i % 4 == 2;

    let s = std::sync::Arc::new(s);
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..WORKERS {
        let (s, sas) = (s.clone(), sas.clone());
        workers.spawn(async move {
            let mut replies = Vec::new();
            for i in (w..N).step_by(WORKERS) {
                let reply = s.insert(&entity(i), &sas, no_content(i)).await;
                replies.push((i, reply));
            }
            replies
        });
    }
    let mut replies = BTreeMap::new();
    while let Some(done) = workers.join_next().await {
        replies.extend(done.expect("a worker"));
    }

    let mut client_errors = Vec::new();
    let mut recovered = 0;
    for (&i, reply) in &replies {
        if !(200..300).contains(&reply.status) {
            client_errors.push(format!("entity {i}: {} {}", reply.status, reply.body));
            continue;
        }
        let dropped = insert_fault(i) == Some(Fault::StoreThenDrop);
        // A dropped insert was stored: its replay met a 409 and was verified.
        // A 503 or a reset was never forwarded: its replay is a first insert.
        assert_eq!(
            reply.header("x-idemproxy-recovered"),
            dropped.then_some("409"),
            "entity {i}: {reply:?}"
        );
        recovered += usize::from(dropped);
        assert!(
            reply.header("etag").is_some(),
            "entity {i}: no etag: {reply:?}"
        );
        if no_content(i) {
            assert_eq!(reply.status, 204, "entity {i}: {reply:?}");
            assert_eq!(reply.body, "", "entity {i}: a 204 with a body");
        } else {
            assert_eq!(reply.status, 201, "entity {i}: {reply:?}");
            assert_subset(&entity(i), &reply.json(), &format!("entity {i}'s answer"));
        }
        let reached = s.inserts_reaching_azurite(&row_key(i));
        let expected = if dropped { 2 } else { 1 };
        assert_eq!(
            reached, expected,
            "entity {i}: inserts that reached Azurite"
        );
    }

    let stored = s.entities().await;
    let mut by_key: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for e in &stored {
        let key = e["RowKey"].as_str().expect("a RowKey").to_owned();
        by_key.entry(key).or_default().push(e);
    }
    let lost: Vec<usize> = (0..N)
        .filter(|&i| !by_key.contains_key(&row_key(i)))
        .collect();
    let duplicated = stored.len() - by_key.len()
        + by_key
            .keys()
            .filter(|k| !(0..N).any(|i| &row_key(i) == *k))
            .count();
    for i in 0..N {
        if let Some(found) = by_key.get(&row_key(i)) {
            assert_subset(&entity(i), found[0], &format!("stored entity {i}"));
        }
    }
    let counts = s.faults.counts();
    summary(&format!(
        "profile azure-table: writes={N} faults={counts} lost={} duplicated={duplicated} client_errors={} (recovered 409s: {recovered})",
        lost.len(),
        client_errors.len(),
    ));
    assert!(
        client_errors.is_empty(),
        "client errors: {client_errors:#?}"
    );
    assert!(lost.is_empty(), "lost: {lost:?}");
    assert_eq!(duplicated, 0, "stored: {stored:#?}");
    assert_eq!(stored.len(), N);
    assert_eq!(
        (counts.unavailable, counts.store_then_drop, counts.reset),
        (N / 6, N / 6, N / 6 + N / 12),
        "faults injected: {counts}"
    );
    let metrics = s.proxy.metrics().await;
    assert_eq!(
        metric_sum(&metrics, "idemproxy_conflicts_recovered_total"),
        (N / 6) as f64
    );
    assert_eq!(
        metric_sum(&metrics, "idemproxy_conflicts_passed_total"),
        0.0
    );
}

/// With an add-only SAS (no `r`), the verification read is refused: a
/// dropped insert's replay meets its own entity, and the 409 reaches the
/// client as Azurite sent it (the README says so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_add_only_sas_passes_the_409_through() {
    // The first insert's answer is dropped.
    let first = Mutex::new(true);
    let plan = FaultPlan {
        matches: Box::new(move |req| {
            req.request_line()
                .starts_with("POST /devstoreaccount1/addonly?")
                && std::mem::replace(&mut *first.lock().unwrap(), false)
        }),
        pick: Pick::Always,
        drop_after: DropAfter::FirstByte,
    };
    let Some(s) = TableSetup::start("addonly", plan, Faults::One(Fault::StoreThenDrop)).await
    else {
        return;
    };
    let add_only = azurite::table_sas("addonly", "a");
    let entity = json!({"PartitionKey": "p", "RowKey": "r1", "turn": 1});
    let reply = s.insert(&entity, &add_only, false).await;
    assert_eq!(
        s.faults.counts().store_then_drop,
        1,
        "the first answer was dropped"
    );
    assert_eq!(reply.status, 409, "{reply:?}");
    assert_eq!(
        reply.header("x-ms-error-code"),
        Some("EntityAlreadyExists"),
        "{reply:?}"
    );
    assert_eq!(reply.header("x-idemproxy-recovered"), None, "{reply:?}");
    assert!(reply.body.contains("EntityAlreadyExists"), "{reply:?}");
    // The verification was tried, and refused by Azurite.
    let reads: Vec<FramedRequest> = s
        .faults
        .requests()
        .into_iter()
        .filter(|r| r.request_line().starts_with("GET "))
        .collect();
    assert_eq!(reads.len(), 1, "one verification read");
    assert!(
        reads[0]
            .request_line()
            .contains("addonly(PartitionKey=%27p%27,RowKey=%27r1%27)")
            || reads[0]
                .request_line()
                .contains("addonly(PartitionKey='p',RowKey='r1')"),
        "{}",
        reads[0].request_line()
    );
    let metrics = s.proxy.metrics().await;
    assert_eq!(
        metric_sum(&metrics, "idemproxy_conflicts_recovered_total"),
        0.0
    );
    assert_eq!(
        metric_sum(&metrics, "idemproxy_conflicts_passed_total"),
        1.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            r#"idemproxy_conflicts_passed_total{reason="verify_failed"}"#
        ),
        Some(1.0),
        "the read was refused (403), not a mismatch"
    );
    // Stored once.
    let stored = s.entities().await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_subset(&entity, &stored[0], "the stored entity");
}

/// The script for the official `azure-data-tables` SDK: inserts an entity
/// through the proxy (SDK retries off: any retry is the proxy's), reads it
/// back, then tries a different entity under the same keys, which must
/// fail as a conflict. Prints one JSON line.
const TABLE_SDK_SCRIPT: &str = r#"
import json, sys
from azure.core.credentials import AzureSasCredential
from azure.core.exceptions import HttpResponseError
from azure.data.tables import TableClient

endpoint, table, sas = sys.argv[1:4]
client = TableClient(endpoint=endpoint, table_name=table,
                     credential=AzureSasCredential(sas), retry_total=0)
entity = {"PartitionKey": "agent-7", "RowKey": "turn-1", "role": "assistant",
          "tokens": 42, "final": True}

def error(e):
    return {"status": e.status_code, "code": e.response.headers.get("x-ms-error-code")}

out = {}
try:
    created = client.create_entity(entity=entity)
    out["created"] = {k: (None if v is None else str(v)) for k, v in created.items()}
except HttpResponseError as e:
    out["create_error"] = error(e)
got = client.get_entity("agent-7", "turn-1")
out["got"] = dict(got)
out["got_etag"] = got.metadata.get("etag")
try:
    client.create_entity(entity={**entity, "role": "user"})
    out["conflict"] = None
except HttpResponseError as e:
    out["conflict"] = error(e)
print(json.dumps(out))
"#;

/// The `azure-data-tables` SDK's `create_entity` through the proxy while
/// the first answer is dropped: it returns as for a first insert (with an
/// etag), and a real conflict still raises.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_python_sdk_insert_survives_a_dropped_answer() {
    let Some(python) = azurite::sdk_python_or_skip() else {
        return;
    };
    let first = Mutex::new(true);
    let plan = FaultPlan {
        matches: Box::new(move |req| {
            req.request_line().starts_with("POST /devstoreaccount1/sdk")
                && std::mem::replace(&mut *first.lock().unwrap(), false)
        }),
        pick: Pick::Always,
        drop_after: DropAfter::FirstByte,
    };
    let Some(s) = TableSetup::start("sdk", plan, Faults::One(Fault::StoreThenDrop)).await else {
        return;
    };
    let endpoint = s.proxy.url(&format!("/{ACCOUNT}"));
    let sas = azurite::table_sas("sdk", "raud");
    let out = azurite::run_python(
        &python,
        TABLE_SDK_SCRIPT,
        &[&endpoint, "sdk", &sas],
        Duration::from_secs(30),
    )
    .await;
    let doc: Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("script output ({e}): {out}"));
    let stored = s.entities().await;
    summary(&format!(
        "profile azure-table (azure-data-tables SDK): writes=1 faults={} lost={} duplicated={} client_errors={}",
        s.faults.counts(),
        usize::from(stored.is_empty()),
        stored.len().saturating_sub(1),
        usize::from(doc.get("create_error").is_some()),
    ));
    assert_eq!(s.faults.counts().store_then_drop, 1, "{doc}");
    if let Some(error) = doc.get("create_error") {
        // Say why, when it is the known cause: the SDK annotates every
        // property with its type, Edm.String included, and no read of the
        // entity (any odata= level) returns an Edm.String annotation.
        let insert = s
            .faults
            .requests()
            .into_iter()
            .find(|r| r.request_line().starts_with("POST "))
            .expect("the insert reached Azurite");
        let sent = insert.json().unwrap_or_default();
        let annotations: Vec<&String> = sent
            .as_object()
            .map(|o| o.keys().filter(|k| k.ends_with("@odata.type")).collect())
            .unwrap_or_default();
        let metrics = s.proxy.metrics().await;
        let passed: Vec<&str> = metrics
            .lines()
            .filter(|l| l.starts_with("idemproxy_conflicts_passed_total{"))
            .collect();
        panic!(
            "create_entity raised {error} after a dropped answer: the proxy did not recover the \
             replay's 409 ({passed:?}). The SDK sent {sent}; its type annotations \
             {annotations:?} are in no read of the stored entity ({}), so the profile's \
             match=json-subset fails the verification",
            doc["got"]
        );
    }
    let etag = doc["created"]["etag"].as_str().unwrap_or("");
    assert!(
        etag.starts_with("W/\"datetime'"),
        "create_entity's etag: {doc}"
    );
    assert_eq!(doc["got_etag"].as_str(), Some(etag), "{doc}");
    assert_eq!(doc["got"]["role"], "assistant", "{doc}");
    assert_eq!(doc["got"]["tokens"], 42, "{doc}");
    assert_eq!(
        doc["conflict"],
        json!({"status": 409, "code": "EntityAlreadyExists"}),
        "a different entity under the same keys is a real conflict: {doc}"
    );
    assert_eq!(
        s.inserts_reaching_azurite("turn-1"),
        3,
        "the dropped insert, the proxy's replay, the conflicting one"
    );
    let metrics = s.proxy.metrics().await;
    assert_eq!(
        metric_sum(&metrics, "idemproxy_conflicts_recovered_total"),
        1.0
    );
    assert_eq!(
        metric_sum(&metrics, "idemproxy_conflicts_passed_total"),
        1.0
    );
    assert_eq!(stored.len(), 1, "{stored:?}");
}

// ---------------------------------------------------------------------------
// Azure Blob leases
// ---------------------------------------------------------------------------

/// The lease duration the tests ask for: Azure's minimum.
const LEASE_SECS: u64 = 15;

/// Azurite's blob service, a fault proxy (or tap) in front of it, idemproxy
/// with `--profile azure-blob-lease` in front of that, and one container.
struct BlobSetup {
    azurite: Azurite,
    tap: FaultProxy,
    proxy: TestProxy,
    container: String,
    /// A container SAS with `racwd`: reads, writes and lease calls.
    sas: String,
}

impl BlobSetup {
    async fn start(container: &str, plan: FaultPlan) -> Option<BlobSetup> {
        let azurite = Azurite::blob().await?;
        let create = send(
            "create the container",
            client()
                .put(format!(
                    "{}/{container}?restype=container&{}",
                    azurite.account_url(),
                    azurite::account_sas("b", "sco", "rwdlacu")
                ))
                .header("x-ms-version", VERSION),
        )
        .await;
        assert_eq!(create.status, 201, "create container: {create:?}");
        let tap = FaultProxy::start(&azurite.url(), plan).await;
        let mut flags = vec!["--profile", "azure-blob-lease"];
        flags.extend_from_slice(FAST_RETRIES);
        let proxy = TestProxy::start(&tap.url(), &flags).await;
        Some(BlobSetup {
            azurite,
            tap,
            proxy,
            container: container.to_owned(),
            sas: azurite::blob_sas(container, None, "racwd"),
        })
    }

    /// `/devstoreaccount1/{container}/{blob}`.
    fn path(&self, blob: &str) -> String {
        format!("/{ACCOUNT}/{}/{blob}", self.container)
    }

    /// Writes a block blob straight to Azurite.
    async fn create_blob(&self, blob: &str) {
        let reply = send(
            "create a blob",
            client()
                .put(format!(
                    "{}{}?{}",
                    self.azurite.url(),
                    self.path(blob),
                    self.sas
                ))
                .header("x-ms-version", VERSION)
                .header("x-ms-blob-type", "BlockBlob")
                .body("initial"),
        )
        .await;
        assert_eq!(reply.status, 201, "create blob {blob}: {reply:?}");
    }

    /// A lease call (`PUT ...?comp=lease`) through the proxy.
    async fn lease(&self, blob: &str, action: &str, headers: &[(&str, &str)]) -> Reply {
        let mut req = client()
            .put(
                self.proxy
                    .url(&format!("{}?comp=lease&{}", self.path(blob), self.sas)),
            )
            .header("x-ms-version", VERSION)
            .header("x-ms-lease-action", action);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        send(&format!("lease {action} on {blob}"), req).await
    }

    /// Acquires a 15 s lease through the proxy; returns its id.
    async fn acquire(&self, blob: &str) -> String {
        let duration = LEASE_SECS.to_string();
        let reply = self
            .lease(blob, "acquire", &[("x-ms-lease-duration", &duration)])
            .await;
        assert_eq!(reply.status, 201, "acquire {blob}: {reply:?}");
        reply
            .header("x-ms-lease-id")
            .expect("an acquire answers x-ms-lease-id")
            .to_owned()
    }

    /// Writes the blob through the proxy under lease `id`.
    async fn write(&self, blob: &str, id: &str, content: &str) -> Reply {
        send(
            "write a leased blob",
            client()
                .put(self.proxy.url(&format!("{}?{}", self.path(blob), self.sas)))
                .header("x-ms-version", VERSION)
                .header("x-ms-blob-type", "BlockBlob")
                .header("x-ms-lease-id", id)
                .body(content.to_owned()),
        )
        .await
    }

    /// `x-ms-lease-state` of the blob, straight from Azurite.
    async fn lease_state(&self, blob: &str) -> String {
        let reply = send(
            "HEAD the blob",
            client()
                .head(format!(
                    "{}{}?{}",
                    self.azurite.url(),
                    self.path(blob),
                    self.sas
                ))
                .header("x-ms-version", VERSION),
        )
        .await;
        assert_eq!(reply.status, 200, "HEAD {blob}: {reply:?}");
        reply
            .header("x-ms-lease-state")
            .expect("x-ms-lease-state")
            .to_owned()
    }

    /// The lease calls with `action` on `blob` that reached Azurite
    /// (`lease_id`: only those carrying it).
    fn lease_calls(&self, blob: &str, action: &str, lease_id: Option<&str>) -> Vec<FramedRequest> {
        let path = format!("{}?", self.path(blob));
        self.tap
            .requests()
            .into_iter()
            .filter(|r| r.request_line().starts_with(&format!("PUT {path}")))
            .filter(|r| r.header("x-ms-lease-action") == Some(action))
            .filter(|r| lease_id.is_none() || r.header("x-ms-lease-id") == lease_id)
            .collect()
    }

    /// Renewals of lease `id` on `blob` that reached Azurite.
    fn renews(&self, blob: &str, id: &str) -> usize {
        self.lease_calls(blob, "renew", Some(id)).len()
    }
}

/// Three 15 s leases at once, for 16.5 s: a silent client's and a busy
/// client's (a write under the lease every second) are renewed every 5 s
/// (a third of `x-ms-lease-duration`) and still leased after the duration;
/// a third one released through the proxy after its first renewal gets no
/// renewal after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_leases_are_renewed_for_silent_and_busy_clients_until_released() {
    let Some(s) = BlobSetup::start("leases", FaultPlan::none()).await else {
        return;
    };
    for blob in ["silent", "busy", "released"] {
        s.create_blob(blob).await;
    }
    let started = Instant::now();
    let silent = s.acquire("silent").await;
    let busy = s.acquire("busy").await;
    let released = s.acquire("released").await;
    assert_eq!(admin_sessions(&s.proxy).await.len(), 3);
    let s = std::sync::Arc::new(s);

    // The busy client: a write under its lease every second until the end.
    const RUN: Duration = Duration::from_millis(16_500);
    // When each renewal of the two kept leases showed on the wire (polled).
    let sampler = {
        let (s, silent, busy) = (s.clone(), silent.clone(), busy.clone());
        tokio::spawn(async move {
            let mut seen: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
            while started.elapsed() < RUN {
                for (times, (blob, id)) in
                    seen.iter_mut().zip([("silent", &silent), ("busy", &busy)])
                {
                    while times.len() < s.renews(blob, id) {
                        times.push(started.elapsed());
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            seen
        })
    };
    let writer = {
        let (s, busy) = (s.clone(), busy.clone());
        tokio::spawn(async move {
            let mut writes = 0;
            while started.elapsed() < RUN - Duration::from_millis(500) {
                let reply = s.write("busy", &busy, &format!("write {writes}")).await;
                assert_eq!(
                    reply.status,
                    201,
                    "busy write {writes} at {:.1} s: {reply:?} (412 means the lease was lost)",
                    started.elapsed().as_secs_f64()
                );
                writes += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            writes
        })
    };

    // The third client releases its lease once the proxy has renewed it once.
    within("a first renewal of the lease to be released", async {
        while s.renews("released", &released) == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let first_renewal = started.elapsed();
    let renewal = &s.lease_calls("released", "renew", Some(&released))[0];
    assert_eq!(
        renewal.header("x-ms-version"),
        Some(VERSION),
        "a renewal carries the client's x-ms-version: {}",
        renewal.head
    );
    assert!(
        renewal.request_line().contains("comp=lease") && renewal.request_line().contains("sig="),
        "a renewal keeps the acquire's query (its SAS): {}",
        renewal.request_line()
    );
    let reply = s
        .lease("released", "release", &[("x-ms-lease-id", &released)])
        .await;
    assert_eq!(reply.status, 200, "release: {reply:?}");
    // A renewal already on its way may still land.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let renews_at_release = s.renews("released", &released);
    assert_eq!(
        admin_sessions(&s.proxy).await.len(),
        2,
        "released: no longer tracked"
    );

    // Twelve seconds in: two renewals each (at about 5 s and 10 s).
    tokio::time::sleep(Duration::from_secs(12).saturating_sub(started.elapsed())).await;
    let at_12 = (s.renews("silent", &silent), s.renews("busy", &busy));
    assert!(
        at_12.0 >= 2 && at_12.1 >= 2,
        "renewals after 12 s (silent, busy): {at_12:?}; expected about every {} s",
        LEASE_SECS / 3
    );

    // Past the lease duration: both still leased, and only renewals can have done it.
    tokio::time::sleep(RUN.saturating_sub(started.elapsed())).await;
    let elapsed = started.elapsed();
    let writes = writer.await.expect("the busy writer");
    let states = (
        s.lease_state("silent").await,
        s.lease_state("busy").await,
        s.lease_state("released").await,
    );
    let renewals = (s.renews("silent", &silent), s.renews("busy", &busy));
    let lease_lost = [&states.0, &states.1]
        .iter()
        .filter(|st| st.as_str() != "leased")
        .count();
    // The steady rate: renewals per minute between each lease's first and last.
    let seen = sampler.await.expect("the sampler");
    let rates: Vec<f64> = seen
        .iter()
        .filter(|t| t.len() >= 2)
        .map(|t| (t.len() - 1) as f64 * 60.0 / (t[t.len() - 1] - t[0]).as_secs_f64())
        .collect();
    let per_minute = rates.iter().sum::<f64>() / rates.len().max(1) as f64;
    summary(&format!(
        "profile azure-blob-lease: sessions=3 heartbeats_per_session_minute={per_minute:.1} lease_lost={lease_lost} \
         (silent={} busy={} renewals in {:.1} s, first at {:.1} s; {writes} busy writes; released after its first renewal at {:.1} s, renewals after release={})",
        renewals.0,
        renewals.1,
        elapsed.as_secs_f64(),
        seen[0].first().unwrap_or(&Duration::ZERO).as_secs_f64(),
        first_renewal.as_secs_f64(),
        s.renews("released", &released) - renews_at_release,
    ));
    assert_eq!(
        (states.0.as_str(), states.1.as_str()),
        ("leased", "leased"),
        "{:.1} s after a {LEASE_SECS} s acquire (renewals: {renewals:?})",
        elapsed.as_secs_f64()
    );
    assert_eq!(states.2, "available", "the released lease");
    assert!(
        (2..=4).contains(&renewals.0) && (2..=4).contains(&renewals.1),
        "renewals in {:.1} s (silent, busy): {renewals:?}; at a third of {LEASE_SECS} s (±10%), 3 are due",
        elapsed.as_secs_f64()
    );
    assert_eq!(
        s.renews("released", &released),
        renews_at_release,
        "renewals after the release"
    );
    assert!(writes >= 14, "only {writes} busy writes");
    assert!(
        (10.0..=14.0).contains(&per_minute),
        "{per_minute:.1} renewals a minute; a third of {LEASE_SECS} s is 12"
    );

    // The silent client's lease is still its own: a write under it works.
    let reply = s.write("silent", &silent, "after the silence").await;
    assert_eq!(reply.status, 201, "{reply:?}");
    for (blob, id) in [("silent", &silent), ("busy", &busy)] {
        let reply = s.lease(blob, "release", &[("x-ms-lease-id", id)]).await;
        assert_eq!(reply.status, 200, "release {blob}: {reply:?}");
    }
    assert!(admin_sessions(&s.proxy).await.is_empty());
    let metrics = s.proxy.metrics().await;
    assert_eq!(
        metric_sum(&metrics, "idemproxy_heartbeats_total") as usize,
        renewals.0 + renewals.1 + s.renews("released", &released),
        "heartbeats counted = renewals on the wire"
    );
}

/// The script for the official `azure-storage-blob` SDK: acquires a lease
/// through the proxy with `BlobLeaseClient` (SDK retries off), writes under
/// it, releases it. Prints one JSON line.
const BLOB_SDK_SCRIPT: &str = r#"
import json, sys
from azure.storage.blob import BlobClient

account_url, container, blob, sas = sys.argv[1:5]
client = BlobClient(account_url=account_url, container_name=container, blob_name=blob,
                    credential=sas, retry_total=0)
lease = client.acquire_lease(lease_duration=15)
acquired = lease.id
client.upload_blob(b"written under the lease", overwrite=True, lease=lease)
state = client.get_blob_properties().lease.state
lease.release()
print(json.dumps({"lease_id": acquired, "state": state,
                  "after": client.get_blob_properties().lease.state}))
"#;

/// A lost answer to an acquire: without `x-ms-proposed-lease-id` it is not
/// replayed (the client gets a 502 that says it may have been processed);
/// with one it is, and the client gets its lease; so is the
/// `azure-storage-blob` SDK's `acquire_lease`, which proposes an id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_lease_acquire_replays_only_with_a_proposed_id() {
    let seen = Mutex::new(HashSet::new());
    let plan = FaultPlan {
        // The first acquire of each blob named drop-*.
        matches: Box::new(move |req| {
            let line = req.request_line();
            line.starts_with("PUT /devstoreaccount1/acquire/drop-")
                && req.header("x-ms-lease-action") == Some("acquire")
                && seen
                    .lock()
                    .unwrap()
                    .insert(line.split('?').next().unwrap_or("").to_owned())
        }),
        pick: Pick::Always,
        drop_after: DropAfter::FirstByte,
    };
    let Some(s) = BlobSetup::start("acquire", plan).await else {
        return;
    };
    for blob in ["drop-noid", "drop-proposed", "drop-sdk"] {
        s.create_blob(blob).await;
    }
    let duration = LEASE_SECS.to_string();

    // Without a proposed id: not replayed.
    let reply = s
        .lease(
            "drop-noid",
            "acquire",
            &[("x-ms-lease-duration", &duration)],
        )
        .await;
    assert_eq!(reply.status, 502, "{reply:?}");
    let doc = reply.json();
    assert_eq!(doc["may_have_been_processed"], true, "{doc}");
    assert_eq!(doc["attempts"], 1, "{doc}");
    assert_eq!(
        s.lease_calls("drop-noid", "acquire", None).len(),
        1,
        "acquires on the wire"
    );
    // Azurite did take the lease (its id never reached anyone): that is why
    // a replay, meeting it with a 409, would be no help.
    assert_eq!(s.lease_state("drop-noid").await, "leased");
    assert!(
        admin_sessions(&s.proxy).await.is_empty(),
        "a 502 registers no session"
    );

    // With a proposed id: replayed, and the client gets the lease.
    let proposed = uuid::Uuid::new_v4().to_string();
    let reply = s
        .lease(
            "drop-proposed",
            "acquire",
            &[
                ("x-ms-lease-duration", &duration),
                ("x-ms-proposed-lease-id", &proposed),
            ],
        )
        .await;
    assert_eq!(reply.status, 201, "{reply:?}");
    assert_eq!(reply.header("x-ms-lease-id"), Some(proposed.as_str()));
    assert_eq!(reply.header("x-idemproxy-attempts"), Some("2"), "{reply:?}");
    assert_eq!(s.lease_calls("drop-proposed", "acquire", None).len(), 2);
    assert_eq!(
        admin_sessions(&s.proxy).await.len(),
        1,
        "the lease is tracked"
    );
    let reply = s.write("drop-proposed", &proposed, "mine").await;
    assert_eq!(
        reply.status, 201,
        "a write under the replayed acquire's lease: {reply:?}"
    );

    // The SDK's BlobLeaseClient, whose acquire proposes an id.
    let mut sdk_summary = "skipped (no SDK)".to_owned();
    if let Some(python) = azurite::sdk_python_or_skip() {
        let account_url = s.proxy.url(&format!("/{ACCOUNT}"));
        let out = azurite::run_python(
            &python,
            BLOB_SDK_SCRIPT,
            &[&account_url, "acquire", "drop-sdk", &s.sas],
            Duration::from_secs(30),
        )
        .await;
        let doc: Value = serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("script output ({e}): {out}"));
        assert_eq!(doc["state"], "leased", "{doc}");
        assert_eq!(doc["after"], "available", "{doc}");
        let acquires = s.lease_calls("drop-sdk", "acquire", None);
        assert_eq!(
            acquires.len(),
            2,
            "the dropped acquire and the proxy's replay"
        );
        let sent = acquires[0].header("x-ms-proposed-lease-id");
        assert_eq!(
            sent,
            doc["lease_id"].as_str(),
            "the SDK proposes the id it keeps"
        );
        assert_eq!(s.lease_calls("drop-sdk", "release", None).len(), 1);
        sdk_summary = format!(
            "acquired {} after a dropped answer, wrote, released",
            doc["lease_id"]
        );
    }
    assert_eq!(
        s.tap.counts().store_then_drop,
        3 - usize::from(sdk_summary.starts_with("skipped"))
    );

    let reply = s
        .lease("drop-proposed", "release", &[("x-ms-lease-id", &proposed)])
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(admin_sessions(&s.proxy).await.is_empty());
    summary(&format!(
        "profile azure-blob-lease (acquire replay): faults={} no-proposed-id=502 may_have_been_processed, proposed-id=201 after 2 attempts, SDK: {sdk_summary}",
        s.tap.counts()
    ));
}

/// A `change` to a new id ends the old id's renewals: a 15 s lease acquired
/// as A through the proxy, renewed once by it, changed to B: no renewal of A
/// follows for more than one interval (a third of the duration), the client
/// renews B itself, and A is no longer tracked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_lease_change_ends_the_old_ids_renewals() {
    let Some(s) = BlobSetup::start("change", FaultPlan::none()).await else {
        return;
    };
    s.create_blob("changed").await;
    let (a, b) = (
        uuid::Uuid::new_v4().to_string(),
        uuid::Uuid::new_v4().to_string(),
    );
    let duration = LEASE_SECS.to_string();
    let interval = Duration::from_secs(LEASE_SECS / 3);
    let reply = s
        .lease(
            "changed",
            "acquire",
            &[
                ("x-ms-lease-duration", &duration),
                ("x-ms-proposed-lease-id", &a),
            ],
        )
        .await;
    assert_eq!(reply.status, 201, "acquire: {reply:?}");
    assert_eq!(reply.header("x-ms-lease-id"), Some(a.as_str()), "{reply:?}");
    let tracked = admin_sessions(&s.proxy).await;
    assert_eq!(tracked.len(), 1, "{tracked:?}");
    let digest_of_a = tracked[0]["digest"].clone();

    // The proxy renews A (so that its silence afterwards means something).
    within("the proxy's first renewal of A", async {
        while s.renews("changed", &a) == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    let reply = s
        .lease(
            "changed",
            "change",
            &[("x-ms-lease-id", &a), ("x-ms-proposed-lease-id", &b)],
        )
        .await;
    assert_eq!(reply.status, 200, "change: {reply:?}");
    assert_eq!(reply.header("x-ms-lease-id"), Some(b.as_str()), "{reply:?}");
    // A renewal of A already on its way may still land.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (renews_of_a, changed_at) = (s.renews("changed", &a), Instant::now());
    let heartbeats = metric_sum(&s.proxy.metrics().await, "idemproxy_heartbeats_total");

    // The client renews B itself, as the README says it must.
    let reply = s.lease("changed", "renew", &[("x-ms-lease-id", &b)]).await;
    assert_eq!(reply.status, 200, "renew B: {reply:?}");
    assert_eq!(reply.header("x-ms-lease-id"), Some(b.as_str()), "{reply:?}");
    let tracked = admin_sessions(&s.proxy).await;
    assert!(
        tracked.iter().all(|t| t["digest"] != digest_of_a),
        "A is still tracked after the change: {tracked:?}"
    );

    // More than one interval (±10% jitter) after the change.
    tokio::time::sleep((interval + Duration::from_secs(1)).saturating_sub(changed_at.elapsed()))
        .await;
    let after = s.renews("changed", &a) - renews_of_a;
    let renews_of_b = s.renews("changed", &b);
    let ended = metric_value(
        &s.proxy.metrics().await,
        r#"idemproxy_sessions_ended_total{reason="client_end"}"#,
    );
    summary(&format!(
        "profile azure-blob-lease (change): renewals of A before the change={renews_of_a} after={after} \
         in {:.1} s; renewals of B on the wire={renews_of_b} (the client's own: 1); tracked after: {}",
        changed_at.elapsed().as_secs_f64(),
        admin_sessions(&s.proxy)
            .await
            .iter()
            .map(|t| format!(
                "{} next_heartbeat_in_secs={}",
                t["source"], t["next_heartbeat_in_secs"]
            ))
            .collect::<Vec<_>>()
            .join(", "),
    ));
    assert_eq!(after, 0, "renewals of the old id A after the change");
    assert_eq!(
        metric_sum(&s.proxy.metrics().await, "idemproxy_heartbeats_total"),
        heartbeats,
        "heartbeats sent after the change"
    );
    assert_eq!(ended, Some(1.0), "A ended by the client's change");
    let tracked = admin_sessions(&s.proxy).await;
    assert!(
        tracked.iter().all(|t| t["digest"] != digest_of_a),
        "A is tracked again: {tracked:?}"
    );
    assert_eq!(
        renews_of_b, 1,
        "renewals of B: only the client's own (the README: the new id is not renewed by idemproxy)"
    );
    assert_eq!(s.lease_state("changed").await, "leased");
    // B holds the lease: a write under it works, one under A is refused.
    let reply = s.write("changed", &b, "under B").await;
    assert_eq!(reply.status, 201, "write under B: {reply:?}");
    let reply = s.write("changed", &a, "under A").await;
    assert_eq!(
        reply.status, 412,
        "write under A after the change: {reply:?}"
    );
    let reply = s
        .lease("changed", "release", &[("x-ms-lease-id", &b)])
        .await;
    assert_eq!(reply.status, 200, "release B: {reply:?}");
    assert!(admin_sessions(&s.proxy).await.is_empty());
}
