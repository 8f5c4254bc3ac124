//! Every table is bounded in bytes, keys and ids included: one client that
//! sends 3,000 sessions with 1 KiB ids and 6 KiB credentials, 300 with
//! 20 KiB ids, and 3,000 client keys of 255 bytes moves the memory of the
//! `idemproxy` binary (its own allocator, its own process) by a bounded
//! amount.

use futures_util::StreamExt;
use testkit::*;

/// VmRSS of process `pid`, in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kib / 1024.0
}

/// An upstream that answers `200 ok` and keeps nothing of what it gets
/// (the test kit's recording upstream would hold every header).
async fn forgetful_upstream() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(response(200, "ok"))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

/// Sends `n` requests, 32 at a time, built by `make(i)`; all must get `expect`.
async fn flood(n: usize, expect: u16, make: impl Fn(usize) -> reqwest::RequestBuilder) {
    let statuses: Vec<u16> = futures_util::stream::iter((0..n).map(|i| {
        let req = make(i);
        async move { req.send().await.map(|r| r.status().as_u16()).unwrap_or(0) }
    }))
    .buffer_unordered(32)
    .collect()
    .await;
    assert!(
        statuses.iter().all(|&s| s == expect),
        "{:?}",
        &statuses[..10]
    );
}

/// Oversized sessions and keys from one client leave the session table
/// within 2 MiB, the cache within 512 KiB, and the binary within 24 MiB of
/// its resident size after a warm-up (unbounded, the sessions alone would
/// hold 22 MB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_sessions_and_keys_keep_memory_bounded() {
    let upstream = forgetful_upstream().await;
    let mut cmd = idemproxy_command();
    cmd.env("IDEMPROXY_UPSTREAM", &upstream)
        .env("IDEMPROXY_LISTEN", "127.0.0.1:0")
        .env("IDEMPROXY_ADMIN_LISTEN", "127.0.0.1:0")
        .env("IDEMPROXY_WORKERS", "1")
        .env("IDEMPROXY_SESSION_SOURCES", "header:x-session-id")
        .env("IDEMPROXY_MAX_SESSION_BYTES", "2MiB")
        .env("IDEMPROXY_IDEMPOTENCY_CACHE_BYTES", "512KiB");
    let proxy = spawn_binary(cmd).await;
    let (pid, listen, admin) = (proxy.pid, proxy.listen, proxy.admin);
    let url = |path: &str| format!("http://{listen}{path}");
    let http = client();
    flood(32, 200, |_| http.get(url("/warm-up"))).await;
    let before = rss_mib(pid);
    let token = |i: usize| format!("Bearer {i:0>6000}");

    flood(3_000, 200, |i| {
        http.get(url("/v1/work"))
            .header("x-session-id", format!("{i:0>1024}"))
            .header("authorization", token(i))
    })
    .await;
    flood(300, 200, |i| {
        http.get(url("/v1/work"))
            .header("x-session-id", format!("{i:0>20000}"))
    })
    .await;
    flood(3_000, 200, |i| {
        http.post(url("/v1/entries"))
            .header("idempotency-key", format!("{i:0>255}"))
            .body("{}")
    })
    .await;
    // A key over 255 bytes is refused before anything is stored.
    let long = http
        .post(url("/v1/entries"))
        .header("idempotency-key", "k".repeat(30_000))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(long.status(), 400);

    let metrics = http
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let table = metric_value(&metrics, "idemproxy_session_table_bytes").unwrap();
    assert!(table <= 2.0 * 1024.0 * 1024.0, "{table}");
    let untracked = "idemproxy_sessions_untracked_total{reason=\"id_too_long\"}";
    assert_eq!(metric_value(&metrics, untracked), Some(300.0), "{metrics}");
    let evicted = "idemproxy_idempotency_cache_total{result=\"evicted\"}";
    assert!(metric_value(&metrics, evicted).unwrap() > 0.0, "{metrics}");
    let grown = rss_mib(pid) - before;
    assert!(grown < 24.0, "RSS grew by {grown:.1} MiB");
    eprintln!("idemproxy RSS grew by {grown:.1} MiB (before {before:.1} MiB)");
}

/// 500 keep-alive connections that each made one request and then went idle
/// give back hyper's read and write buffers (16 KiB a connection) after the
/// idle grace, so they add under 4 MiB to the binary; each still answers its
/// next request on the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_hold_no_buffers_and_still_answer() {
    const CONNECTIONS: usize = 500;
    let upstream = forgetful_upstream().await;
    let mut cmd = idemproxy_command();
    cmd.env("IDEMPROXY_UPSTREAM", &upstream)
        .env("IDEMPROXY_LISTEN", "127.0.0.1:0")
        .env("IDEMPROXY_ADMIN_LISTEN", "127.0.0.1:0")
        .env("IDEMPROXY_WORKERS", "1");
    let proxy = spawn_binary(cmd).await;
    let (pid, listen) = (proxy.pid, proxy.listen);
    let get = format!("GET /v1/state HTTP/1.1\r\nHost: {listen}\r\n\r\n");
    let exchange = |mut conn: tokio::net::TcpStream| {
        let get = get.clone();
        async move {
            write_all(&mut conn, get.as_bytes()).await;
            let status = read_response(&mut conn).await.map_or(0, |r| r.status);
            (conn, status)
        }
    };
    // Warm-up: the allocator's and the runtime's first pages.
    let warm = tokio::net::TcpStream::connect(listen).await.unwrap();
    assert_eq!(within("warm-up", exchange(warm)).await.1, 200);
    let before = rss_mib(pid);

    let opened: Vec<_> = futures_util::stream::iter(0..CONNECTIONS)
        .map(|_| async {
            let conn = tokio::net::TcpStream::connect(listen).await.unwrap();
            exchange(conn).await
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(opened.iter().all(|(_, status)| *status == 200));
    // Two idle grace periods and a little: every connection is parked.
    tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
    let added = rss_mib(pid) - before;
    eprintln!("{CONNECTIONS} idle connections added {added:.2} MiB (before {before:.1} MiB)");
    assert!(
        added < 4.0,
        "{CONNECTIONS} idle connections added {added:.2} MiB"
    );

    let again: Vec<_> = futures_util::stream::iter(opened)
        .map(|(conn, _)| exchange(conn))
        .buffer_unordered(32)
        .collect()
        .await;
    let alive = again.iter().filter(|(_, status)| *status == 200).count();
    assert_eq!(alive, CONNECTIONS, "idle connections stopped answering");
}
