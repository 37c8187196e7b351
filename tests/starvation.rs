//! Nobody can starve the vault: not with idle sockets before the handshake, not with
//! streams a certificate without rights opens, not by being refused over and over.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::time::{Duration, Instant};

use common::VaultDir;
use credvault::proto::ListProvidersRequest;

/// One call by the app on a new connection, which must complete within 2 s.
async fn app_call_within_2s(vault: &common::TestVault) -> Result<(), String> {
    let started = Instant::now();
    let called = tokio::time::timeout(Duration::from_secs(2), async {
        vault
            .client()
            .await
            .list_providers(ListProvidersRequest {})
            .await
    })
    .await;
    match called {
        Ok(Ok(_)) if started.elapsed() < Duration::from_secs(2) => Ok(()),
        other => Err(format!("{other:?} after {:?}", started.elapsed())),
    }
}

/// How many calls the audit events after `after` account for that `matches`
/// picks out: an event's `count`, or 1 for an event about one call.
async fn accounted(
    dir: &VaultDir,
    vault: &common::TestVault,
    after: u64,
    matches: impl Fn(&credvault::proto::AuditEvent) -> bool,
) -> (u64, usize) {
    let mut stream = dir.audit_stream(vault, after).await;
    let (mut calls, mut events) = (0, 0);
    while let Ok(Ok(Some(e))) =
        tokio::time::timeout(Duration::from_millis(500), stream.message()).await
    {
        if matches(&e) {
            calls += e.count.max(1);
            events += 1;
        }
    }
    (calls, events)
}

#[tokio::test]
async fn idle_sockets_without_a_certificate_do_not_lock_out_clients() {
    let dir = VaultDir::new();
    let mut config = dir.config();
    config.limits.max_connections = 100;
    let vault = dir.start_with(config).await;
    // Three times the connection limit, none of which ever says a word, all
    // from the client's own address.
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(tokio::net::TcpStream::connect(vault.addr).await.unwrap());
    }
    // Let the vault accept them all.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let called = app_call_within_2s(&vault).await;
    assert!(
        called.is_ok(),
        "a proper client was locked out by {} idle sockets: {called:?}",
        idle.len()
    );
    drop(idle);
}

/// The resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kb * 1024
}

/// Opens `streams` gRPC calls to `path` on `sender`, each sending one
/// message of `bytes` bytes, and returns how many got any answer.
async fn flood(
    mut sender: h2::client::SendRequest<bytes::Bytes>,
    path: &'static str,
    streams: usize,
    message: bytes::Bytes,
) -> usize {
    let mut answers = Vec::new();
    for _ in 0..streams {
        let Ok(ready) = sender.clone().ready().await else {
            break;
        };
        sender = ready;
        let request = http::Request::post(format!("https://localhost{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let Ok((answer, mut body)) = sender.send_request(request, false) else {
            break;
        };
        // h2 queues what the window does not yet allow; the vault reads it
        // only as fast as it consumes it.
        let _ = body.send_data(message.clone(), true);
        answers.push(tokio::spawn(async move {
            let _keep = body;
            answer.await.is_ok()
        }));
    }
    let mut answered = 0;
    for a in answers {
        answered += usize::from(a.await.unwrap_or(false));
    }
    answered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_streams_from_an_identity_without_rights_buffer_nothing() {
    const MESSAGE: usize = 1_000_000;
    let dir = VaultDir::new();
    let config = dir.path().join("credvault.toml");
    std::fs::write(&config, dir.config().to_toml()).unwrap();
    let server = common::spawn_server(&config).await;
    let pid = server.process.id().unwrap();
    let port: u16 = server.url.rsplit(':').next().unwrap().parse().unwrap();
    // Warm up the vault's allocator and caches with a few proper calls.
    let mut app = credvault::proto::credentials_client::CredentialsClient::new(
        dir.channel_for_url(&server.url, common::APP).await,
    );
    for _ in 0..5 {
        app.list_providers(ListProvidersRequest {}).await.unwrap();
    }
    let before = rss(pid);

    let stranger = dir
        .ca
        .issue(
            "stranger",
            credvault::dev::certs::Subject::ClientUris(&["spiffe://credvault.local/stranger"]),
        )
        .unwrap();
    // A gRPC message header announcing MESSAGE bytes, then the bytes.
    let mut message = vec![0u8];
    message.extend_from_slice(&u32::try_from(MESSAGE).unwrap().to_be_bytes());
    message.resize(5 + MESSAGE, b'x');
    let message = bytes::Bytes::from(message);
    let mut floods = Vec::new();
    for _ in 0..8 {
        let (sender, _) = common::raw_h2(port, dir.ca.cert_pem(), &stranger).await;
        floods.push(tokio::spawn(flood(
            sender,
            "/credvault.v1.Credentials/Store",
            100,
            message.clone(),
        )));
    }
    let mut peak = before;
    let mut served = 0;
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        peak = peak.max(rss(pid));
        let called = tokio::time::timeout(
            Duration::from_secs(2),
            app.list_providers(ListProvidersRequest {}),
        )
        .await;
        assert!(
            matches!(called, Ok(Ok(_))),
            "an authorized call failed: {called:?}"
        );
        served += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for f in floods {
        f.abort();
    }
    let growth = peak.saturating_sub(before);
    eprintln!(
        "800 streams of {MESSAGE} bytes: RSS {} MiB before, peak growth {} MiB; {served} authorized calls served",
        before >> 20,
        growth >> 20
    );
    assert!(growth < 64 << 20, "the vault grew by {} MiB", growth >> 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_calls_are_counted_not_written_one_by_one() {
    const CALLS: usize = 5_000;
    const STRANGER: &str = "spiffe://credvault.local/stranger";
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let mut audit = credvault::proto::audit_client::AuditClient::new(
        dir.channel_as(&vault, "spiffe://credvault.local/auditor")
            .await,
    );
    let head = |h: credvault::proto::AuditHead| h.sequence;
    let before = head(
        audit
            .head(credvault::proto::HeadRequest {})
            .await
            .unwrap()
            .into_inner(),
    );
    let stranger = credvault::proto::credentials_client::CredentialsClient::new(
        dir.channel_as(&vault, STRANGER).await,
    );
    let mut callers = Vec::new();
    for _ in 0..50 {
        let mut c = stranger.clone();
        callers.push(tokio::spawn(async move {
            for _ in 0..CALLS / 50 {
                let denied = c.list_providers(ListProvidersRequest {}).await.unwrap_err();
                assert_eq!(denied.code(), tonic::Code::PermissionDenied);
            }
        }));
    }
    for c in callers {
        c.await.unwrap();
    }
    // The last window's sum is written when it ends (a second later).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = head(
        audit
            .head(credvault::proto::HeadRequest {})
            .await
            .unwrap()
            .into_inner(),
    );
    let (accounted, events) = accounted(&dir, &vault, before, |e| {
        e.sequence <= after
            && e.identity == STRANGER
            && e.method == "Credentials.ListProviders"
            && e.outcome == "PERMISSION_DENIED"
    })
    .await;
    eprintln!("{CALLS} denied calls: {events} events, accounting for {accounted} calls");
    assert_eq!(
        accounted, CALLS as u64,
        "every refused call is accounted for"
    );
    assert!(
        events <= 40,
        "{CALLS} denied calls wrote {events} events ({} in all)",
        after - before
    );
}

/// The gRPC status of one call of `path` with a well-formed `size`-byte message, sent raw.
async fn status_of_raw_call(
    sender: h2::client::SendRequest<bytes::Bytes>,
    path: &str,
    size: usize,
) -> String {
    let mut message = vec![0u8];
    message.extend_from_slice(&u32::try_from(size).unwrap().to_be_bytes());
    if size > 0 {
        // One unknown bytes field (number 15), which decoders skip: a
        // well-formed message of exactly `size` bytes.
        let n = size - 4;
        assert!((1 << 14..1 << 21).contains(&n), "a 3-byte length");
        let n = u32::try_from(n).unwrap();
        message.extend_from_slice(&[
            15 << 3 | 2,
            (n & 0x7f) as u8 | 0x80,
            (n >> 7 & 0x7f) as u8 | 0x80,
            (n >> 14) as u8,
        ]);
        message.resize(5 + size, b'x');
    }
    raw_call(sender, path, message).await
}

/// The gRPC status of one call of `path` whose body is `body`, sent raw.
async fn raw_call(
    sender: h2::client::SendRequest<bytes::Bytes>,
    path: &str,
    body: Vec<u8>,
) -> String {
    let request = http::Request::post(format!("https://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let mut sender = sender.ready().await.unwrap();
    let (answer, mut sent) = sender.send_request(request, false).unwrap();
    let _ = sent.send_data(body.into(), true);
    let answer = answer.await.unwrap();
    if let Some(code) = answer.headers().get("grpc-status") {
        return code.to_str().unwrap().to_owned();
    }
    let mut received = answer.into_body();
    while let Some(chunk) = received.data().await {
        let _ = chunk;
    }
    let trailers = received.trailers().await.unwrap().unwrap();
    trailers["grpc-status"].to_str().unwrap().to_owned()
}

#[tokio::test]
async fn every_method_but_proxy_takes_only_small_messages() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let admin = dir
        .ca
        .issue(
            "admin",
            credvault::dev::certs::Subject::ClientUris(&["spiffe://credvault.local/admin"]),
        )
        .unwrap();
    let port = vault.addr.port();
    let (sender, _) = common::raw_h2(port, dir.ca.cert_pem(), &admin).await;
    // Unknown fields are skipped by the decoder: a 1 MB Status request is
    // well-formed, and only its size can refuse it.
    assert_eq!(
        status_of_raw_call(sender.clone(), "/credvault.v1.KeyAdmin/Status", 1_000_000).await,
        "8",
        "RESOURCE_EXHAUSTED"
    );
    assert_eq!(
        status_of_raw_call(sender, "/credvault.v1.KeyAdmin/Status", 0).await,
        "0"
    );
    let (app, _) = common::raw_h2(port, dir.ca.cert_pem(), &dir.app).await;
    assert_eq!(
        status_of_raw_call(app.clone(), "/grpc.health.v1.Health/Check", 1_000_000).await,
        "8"
    );
    assert_eq!(
        status_of_raw_call(app, "/credvault.v1.Credentials/ListProviders", 1_000_000).await,
        "8"
    );
}

/// `edge::status::refusal_codes` recognises tonic's own refusals by their
/// messages: this fails loudly if a tonic upgrade changes them.
#[tokio::test]
async fn tonic_refusals_keep_the_codes_the_vault_gives_them() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let (app, _) = common::raw_h2(vault.addr.port(), dir.ca.cert_pem(), &dir.app).await;
    // A field with wire type 7, which does not exist: not a message.
    let undecodable = vec![0, 0, 0, 0, 2, 0x0f, 0x01];
    assert_eq!(
        raw_call(
            app.clone(),
            "/credvault.v1.Credentials/ListProviders",
            undecodable
        )
        .await,
        "3",
        "INVALID_ARGUMENT, not tonic's INTERNAL"
    );
    assert_eq!(
        status_of_raw_call(app, "/credvault.v1.Credentials/ListProviders", 1_000_000).await,
        "8",
        "RESOURCE_EXHAUSTED, not tonic's OUT_OF_RANGE"
    );
}

#[tokio::test]
async fn idle_connections_of_one_identity_cannot_take_every_place() {
    let dir = VaultDir::new();
    let mut config = dir.config();
    config.limits.max_connections = 100;
    let vault = dir.start_with(config).await;
    let stranger = dir.issue("spiffe://credvault.local/stranger");
    // Handshakes that complete, then nothing: not even the HTTP/2 preface.
    let mut idle = Vec::new();
    for _ in 0..150 {
        idle.push(common::raw_tls(vault.addr.port(), dir.ca.cert_pem(), &stranger).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let called = app_call_within_2s(&vault).await;
    assert!(
        called.is_ok(),
        "one identity's {} idle connections locked out the app: {called:?}",
        idle.len()
    );
}

/// Opens a call of `path` with an empty message and leaves it open; its
/// gRPC status if the vault answered at once, else `None` (a live stream).
async fn open_stream(
    sender: &mut h2::client::SendRequest<bytes::Bytes>,
    path: &str,
    keep: &mut Vec<h2::RecvStream>,
) -> Option<String> {
    let request = http::Request::post(format!("https://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    *sender = sender.clone().ready().await.unwrap();
    let (answer, mut sent) = sender.send_request(request, false).unwrap();
    let _ = sent.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true);
    let answer = answer.await.unwrap();
    let status = answer
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_owned());
    keep.push(answer.into_body());
    status
}

#[tokio::test]
async fn streams_of_one_identity_cannot_take_every_place() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let stranger = dir.issue("spiffe://credvault.local/stranger");
    let port = vault.addr.port();
    let mut keep = Vec::new();
    let mut refused = 0;
    for _ in 0..4 {
        let (mut sender, _) = common::raw_h2(port, dir.ca.cert_pem(), &stranger).await;
        for _ in 0..80 {
            if open_stream(&mut sender, "/grpc.health.v1.Health/Watch", &mut keep)
                .await
                .as_deref()
                == Some("8")
            {
                refused += 1;
            }
        }
    }
    assert_eq!(
        refused,
        320 - 256,
        "an identity holds at most max_calls_per_identity (256) streams"
    );
    // Reflection is for identities the policy names.
    let (mut sender, _) = common::raw_h2(port, dir.ca.cert_pem(), &stranger).await;
    assert_eq!(
        open_stream(
            &mut sender,
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            &mut keep,
        )
        .await
        .as_deref(),
        Some("7")
    );
    vault
        .client()
        .await
        .list_providers(ListProvidersRequest {})
        .await
        .unwrap();
}

#[tokio::test]
async fn health_watchers_cannot_take_the_places_of_vault_calls() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let port = vault.addr.port();
    let mut keep = Vec::new();
    // Four identities no rule names, each within its own limit of 256.
    for who in ["a", "b", "c", "d"] {
        let cert = dir.issue(&format!("spiffe://credvault.local/watcher-{who}"));
        for _ in 0..4 {
            let (mut sender, _) = common::raw_h2(port, dir.ca.cert_pem(), &cert).await;
            for _ in 0..64 {
                open_stream(&mut sender, "/grpc.health.v1.Health/Watch", &mut keep).await;
            }
        }
    }
    let called = app_call_within_2s(&vault).await;
    assert!(
        called.is_ok(),
        "1,024 health watchers locked out the app: {called:?}"
    );
}

#[tokio::test]
async fn calls_whose_body_cannot_be_decoded_are_accounted_for() {
    let dir = VaultDir::new();
    let vault = dir.start().await;
    let port = vault.addr.port();
    let (app, _) = common::raw_h2(port, dir.ca.cert_pem(), &dir.app).await;
    // A message whose first byte is field 0: not protobuf.
    let garbage = vec![0, 0, 0, 0, 3, 0, 0, 0];
    for _ in 0..20 {
        assert_eq!(
            raw_call(
                app.clone(),
                "/credvault.v1.Credentials/List",
                garbage.clone()
            )
            .await,
            "3"
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (accounted, _) = accounted(&dir, &vault, 0, |e| {
        e.identity == common::APP
            && e.method == "Credentials.List"
            && e.outcome == "INVALID_ARGUMENT"
    })
    .await;
    assert_eq!(accounted, 20, "every undecodable call is accounted for");
}
