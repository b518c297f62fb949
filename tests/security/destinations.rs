//! The destination policy with private targets not allowed: URLs rejected
//! at registration, and names whose resolved addresses are checked at every
//! delivery attempt.
//!
//! Names resolve through a scripted resolver, so no test looks anything up
//! on the network. No scripted answer is a public address that a connection
//! could reach, and no public URL registered here ever gets a delivery,
//! because every request of these tests must stay on this machine.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use citapro_webhooks::delivery::sender::{Lookup, Resolving};
use serde_json::json;

use crate::helpers::{TestReceiver, assert_invalid_field, ms};
use crate::service::{Service, Settings, attempt};

/// A resolver that returns scripted answers: the nth lookup of a name gets
/// its nth answer, and lookups past the script repeat the last answer.
/// Unknown names fail, so nothing is ever looked up for real.
#[derive(Default)]
struct ScriptedLookup {
    answers: HashMap<String, Vec<Vec<IpAddr>>>,
    calls: Mutex<HashMap<String, usize>>,
}

impl ScriptedLookup {
    fn with(mut self, name: &str, answers: &[&[&str]]) -> ScriptedLookup {
        let parsed = answers
            .iter()
            .map(|answer| {
                answer
                    .iter()
                    .map(|address| address.parse().expect("a scripted IP address"))
                    .collect()
            })
            .collect();
        self.answers.insert(name.to_owned(), parsed);
        self
    }

    /// Returns how many times `name` was looked up.
    fn calls(&self, name: &str) -> usize {
        let calls = self.calls.lock().expect("lookup call counts");
        calls.get(name).copied().unwrap_or(0)
    }
}

impl Lookup for ScriptedLookup {
    fn lookup(&self, host: String) -> Resolving {
        let call = {
            let mut calls = self.calls.lock().expect("lookup call counts");
            let count = calls.entry(host.clone()).or_insert(0);
            *count += 1;
            *count - 1
        };
        let answer = self.answers.get(&host).and_then(|script| {
            script.get(call).or_else(|| script.last()).map(|addresses| {
                addresses
                    .iter()
                    .map(|address| SocketAddr::new(*address, 0))
                    .collect::<Vec<_>>()
            })
        });
        Box::pin(async move {
            match answer {
                Some(addresses) => Ok(addresses),
                None => Err(format!("{host} is not a scripted test name").into()),
            }
        })
    }
}

/// Starts a service that does not allow private targets, resolving through `lookup`.
async fn strict_service(lookup: Arc<ScriptedLookup>, retry_schedule: Vec<Duration>) -> Service {
    Service::start(Settings {
        allow_private_targets: false,
        retry_schedule,
        lookup: Some(lookup),
        ..Settings::default()
    })
    .await
}

/// Returns the port of a receiver's `http://127.0.0.1:PORT/hooks` URL.
fn port_of(receiver: &TestReceiver) -> u16 {
    receiver
        .url
        .trim_start_matches("http://127.0.0.1:")
        .split('/')
        .next()
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("no port in {}", receiver.url))
}

#[tokio::test]
async fn internal_name_blocked_and_retried() {
    let lookup = Arc::new(ScriptedLookup::default().with("internal.test", &[&["127.0.0.1"]]));
    let service = strict_service(lookup.clone(), vec![ms(100), ms(100)]).await;
    let business = service.create_business().await;
    let receiver = TestReceiver::start().await;
    let url = format!("http://internal.test:{}/hooks", port_of(&receiver));
    let webhook = service
        .create_webhook(&business, &url, &["client.created"])
        .await;

    service.send_client_created(&business).await;

    let delivery = service.wait_for_attempts(&business, &webhook.id, 3).await;
    for index in 0..3 {
        let recorded = attempt(&delivery, index);
        assert_eq!(
            recorded["errorKind"], "destination_not_allowed",
            "attempt {index}: {recorded}"
        );
        assert!(
            recorded["statusCode"].is_null(),
            "attempt {index}: {recorded}"
        );
    }
    assert_eq!(delivery["attemptCount"], 3, "one attempt plus two retries");
    assert_eq!(delivery["status"], "failed", "no retries left");
    assert_eq!(lookup.calls("internal.test"), 3, "one lookup per attempt");
    receiver
        .assert_count_stays(0, Duration::from_millis(500), "the loopback receiver")
        .await;
}

/// The answer changes on every lookup, through the spellings of loopback, as
/// a rebinding name's would. Each attempt looks the name up once and checks
/// that answer, so no earlier answer is reused and no later one goes
/// unchecked.
///
/// NOTE: the classic rebinding script starts with a public answer. The
/// service would then connect to that public address, which would send
/// traffic off this machine, so the script uses loopback answers only.
#[tokio::test]
async fn changing_answers_checked_each_attempt() {
    let answers: &[&[&str]] = &[
        &["127.0.0.1"],
        &["::ffff:127.0.0.1"],
        &["127.0.0.2"],
        &["::1"],
    ];
    let lookup = Arc::new(ScriptedLookup::default().with("rebind.test", answers));
    let schedule = vec![ms(100); answers.len() - 1];
    let service = strict_service(lookup.clone(), schedule).await;
    let business = service.create_business().await;
    let receiver = TestReceiver::start().await;
    let url = format!("http://rebind.test:{}/hooks", port_of(&receiver));
    let webhook = service
        .create_webhook(&business, &url, &["client.created"])
        .await;

    service.send_client_created(&business).await;

    let delivery = service
        .wait_for_attempts(&business, &webhook.id, answers.len())
        .await;
    for (index, answer) in answers.iter().enumerate() {
        let recorded = attempt(&delivery, index);
        assert_eq!(
            recorded["errorKind"], "destination_not_allowed",
            "attempt {index}, answer {answer:?}: {recorded}"
        );
    }
    assert_eq!(
        lookup.calls("rebind.test"),
        answers.len(),
        "one lookup per attempt"
    );
    receiver
        .assert_count_stays(0, Duration::from_millis(500), "the loopback receiver")
        .await;
}

/// One non-public address among the answers blocks the whole name. The
/// loopback address comes first, so a faulty check that let the name through
/// would connect to the loopback receiver and never try the public address.
#[tokio::test]
async fn mixed_answer_blocked_as_whole() {
    let lookup =
        Arc::new(ScriptedLookup::default().with("mixed.test", &[&["127.0.0.1", "93.184.216.34"]]));
    let service = strict_service(lookup.clone(), vec![Duration::from_secs(60)]).await;
    let business = service.create_business().await;
    let receiver = TestReceiver::start().await;
    let url = format!("http://mixed.test:{}/hooks", port_of(&receiver));
    let webhook = service
        .create_webhook(&business, &url, &["client.created"])
        .await;

    service.send_client_created(&business).await;

    let delivery = service.wait_for_attempts(&business, &webhook.id, 1).await;
    let first = attempt(&delivery, 0);
    assert_eq!(first["errorKind"], "destination_not_allowed", "{first}");
    assert_eq!(lookup.calls("mixed.test"), 1, "one lookup for the attempt");
    receiver
        .assert_count_stays(0, Duration::from_millis(500), "the loopback receiver")
        .await;
}

/// Webhook URLs that name this machine or a non-public network, in the
/// spellings that parsers disagree on, and URLs with user info or whitespace.
const INTERNAL_URLS: &[&str] = &[
    // Names of this machine.
    "https://localhost/",
    "https://localhost./",
    "https://LocalHost/",
    "https://LOCALHOST./hooks",
    "https://api.localhost/",
    "https://api.LocalHost./",
    "https://%6c%6fcalhost/",
    "https://ｌｏｃａｌｈｏｓｔ/",
    // Loopback in every IPv4 spelling.
    "https://127.0.0.1/",
    "https://127.0.0.1./",
    "https://127.1/",
    "https://127.000.000.001/",
    "https://2130706433/",
    "https://017700000001/",
    "https://0177.0.0.1/",
    "https://0x7f000001/",
    "https://0x7f.0.0.1/",
    "https://0X7F.1/",
    // Unspecified, private, shared and benchmarking ranges.
    "https://0.0.0.0/",
    "https://0/",
    "https://10.0.0.1/",
    "https://172.16.0.1/",
    "https://172.31.255.254/",
    "https://192.168.1.1/",
    "https://100.64.0.1/",
    "https://100.127.255.254/",
    "https://198.18.0.1/",
    // Link-local, including the cloud metadata address in three spellings.
    "https://169.254.169.254/latest/meta-data/",
    "https://2852039166/",
    "https://0xa9fea9fe/",
    "https://169.254.1.1/",
    // Documentation, multicast, reserved and broadcast.
    "https://192.0.2.1/",
    "https://198.51.100.7/",
    "https://203.0.113.5/",
    "https://224.0.0.1/",
    "https://239.255.255.250/",
    "https://240.0.0.1/",
    "https://255.255.255.255/",
    // IPv6 loopback and unspecified, and IPv4-mapped, -compatible and -translated forms.
    "https://[::1]/",
    "https://[::]/",
    "https://[0:0:0:0:0:0:0:1]/",
    "https://[::ffff:127.0.0.1]/",
    "https://[::ffff:7f00:1]/",
    "https://[::ffff:169.254.169.254]/",
    "https://[::ffff:10.0.0.1]/",
    "https://[::127.0.0.1]/",
    "https://[::ffff:0:7f00:1]/",
    // NAT64 and 6to4 addresses that embed a non-public IPv4 address.
    "https://[64:ff9b::7f00:1]/",
    "https://[64:ff9b::a9fe:a9fe]/",
    "https://[64:ff9b::c0a8:101]/",
    "https://[2002:7f00:1::1]/",
    "https://[2002:a00:1::1]/",
    // Link-local, unique local (with the AWS metadata address), multicast,
    // documentation, site-local and Teredo IPv6 ranges.
    "https://[fe80::1]/",
    "https://[fc00::1]/",
    "https://[fd00:ec2::254]/",
    "https://[ff02::1]/",
    "https://[2001:db8::1]/",
    "https://[fec0::1]/",
    "https://[2001::1]/",
    // Plain http is allowed in these tests, private targets are not.
    "http://127.0.0.1:8080/",
    "http://10.1.2.3/",
    // User info.
    "https://user:pass@example.com/",
    "https://user@example.com/",
    "https://:token@example.com/",
    // Whitespace anywhere, never trimmed.
    " https://example.com/",
    "https://example.com/ ",
    "https://exa mple.com/",
    "https://example.com/\thooks",
    "https://example.com/\n",
    "\u{a0}https://example.com/",
];

/// Webhook URLs on public names and addresses, including neighbours of the
/// blocked ranges. They are registered and deleted, and never delivered to.
const PUBLIC_URLS: &[&str] = &[
    "https://example.com/hooks",
    "https://hooks.example.com:8443/a/b?x=1",
    "https://localhost.example.com/",
    "https://8.8.8.8/",
    "https://93.184.216.34/",
    "https://100.128.0.1/",
    "https://172.32.0.1/",
    "https://192.169.0.1/",
    "https://[2606:4700:4700::1111]/",
    "https://[64:ff9b::808:808]/",
    "https://[2002:808:808::1]/",
];

#[tokio::test]
async fn registration_rejects_internal_urls() {
    let service = strict_service(Arc::new(ScriptedLookup::default()), Vec::new()).await;
    let business = service.create_business().await;

    for url in INTERNAL_URLS {
        let response = service
            .post_json(
                "/v1/webhooks",
                &business,
                &json!({ "url": url, "events": ["client.created"] }),
            )
            .await;
        assert_invalid_field(&response, "url", &format!("registering {url:?}"));
    }
    let listed = service.get("/v1/webhooks", &business).await.json();
    assert_eq!(listed["data"], json!([]), "no rejected URL was stored");
}

#[tokio::test]
async fn registration_accepts_public_urls() {
    let service = strict_service(Arc::new(ScriptedLookup::default()), Vec::new()).await;
    let business = service.create_business().await;

    for url in PUBLIC_URLS {
        // Subscribed to an event that this test never sends, and deleted at once.
        let webhook = service
            .create_webhook(&business, url, &["time_block.deleted"])
            .await;
        assert_eq!(webhook.body["url"], *url, "the URL is stored as sent");
        let deliveries = service.deliveries(&business, &webhook.id).await;
        assert!(deliveries.is_empty(), "{url} has no delivery");
        let deleted = service
            .delete(&format!("/v1/webhooks/{}", webhook.id), &business)
            .await;
        assert_eq!(deleted.status, 204, "deleting the webhook for {url}");
    }
}
