//! The backlog scenario: deliveries pile up while the receiver is down, then
//! the receiver comes back and the queue drains.
//!
//! Mode `requeued` measures how fast the service drains a queue: the
//! receiver refuses connections and the service runs with no retries, so
//! every delivery fails once and waits in the store as `failed`. A fresh
//! process then starts, the receiver listens, and `POST
//! /v1/webhooks/{id}/recover` makes every delivery due at the same moment.
//! Nothing but the service limits the rate from then on.
//!
//! Mode `retried` measures retry punctuality under a backlog: the receiver
//! refuses connections until every first attempt has failed and listens
//! before the one retry falls due. The retries fall due at the rate at which
//! the first attempts failed, so the drain rate there is not the service's
//! capacity.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use serde_json::{Map, Value, json};

use crate::BacklogMode;
use crate::driver::{BodyFactory, LoadResult};
use crate::metrics::{DrainMetrics, RetryMetrics, mebibytes, to_instant};
use crate::receiver::Receiver;
use crate::scenarios::{Bench, Credentials, Database};
use crate::service::{ServiceProcess, attempts_total, pending_deliveries, recover};
use crate::stats::{Summary, round_rate};

/// Deliveries of the backlog scenario's comparison run.
const SMALL_BACKLOG: u64 = 10_000;
const DEFAULT_BACKLOG: u64 = 100_000;
const LARGE_BACKLOG: u64 = 1_000_000;
/// Interval between dry-run counts of failed deliveries while first attempts run.
const SETTLE_POLL: Duration = Duration::from_millis(500);

impl Bench {
    /// Runs a 10 000-delivery backlog and the requested larger one, each on
    /// a fresh database, and the ceiling after the last.
    pub async fn run_backlog(&self) -> anyhow::Result<Vec<Value>> {
        let size = self.args.backlog.unwrap_or(if self.args.large {
            LARGE_BACKLOG
        } else {
            DEFAULT_BACKLOG
        });
        let mut sizes = vec![SMALL_BACKLOG.min(size)];
        if size > SMALL_BACKLOG {
            sizes.push(size);
        }
        let fanout = self.args.fanout.unwrap_or(10);
        let mut records = Vec::new();
        for (index, &size) in sizes.iter().enumerate() {
            let mut receiver = Receiver::reserve(None)?;
            let database = self.fresh_database(&format!("backlog-{size}")).await?;
            let outcome = match self.args.backlog_mode {
                BacklogMode::Requeued => {
                    self.run_requeued(&mut receiver, &database, size, fanout)
                        .await
                }
                BacklogMode::Retried => {
                    self.run_retried(&mut receiver, &database, size, fanout)
                        .await
                }
            };
            database.dispose().await;
            let ceiling = match &outcome {
                Ok((_, bodies)) if index + 1 == sizes.len() => match receiver.listen() {
                    Ok(()) => Some(self.measure_ceiling(&receiver, bodies, size).await),
                    Err(error) => Some(Err(error)),
                },
                _ => None,
            };
            receiver.shutdown();
            let (mut record, _) = outcome?;
            if let Some(ceiling) = ceiling {
                record.insert("ceiling".into(), ceiling?);
            }
            let record = Value::Object(record);
            println!("{record}");
            records.push(record);
        }
        Ok(records)
    }

    /// Queues `size` failed deliveries, then times a fresh process draining
    /// them after one `recover` call per webhook.
    async fn run_requeued(
        &self,
        receiver: &mut Receiver,
        database: &Database,
        size: u64,
        fanout: usize,
    ) -> anyhow::Result<(Map<String, Value>, BodyFactory)> {
        let events = size.div_ceil(fanout as u64);
        let credentials = self.create_credentials(database)?;
        let bodies = BodyFactory::new(credentials.business, self.args.body_bytes);
        let since = rfc3339_minutes_ago(5)?;

        // An empty schedule means no retries, so a refused first attempt is final.
        let no_retries = ["--retry-schedule".to_owned(), String::new()];
        let mut queuing =
            self.start_service(database, &no_retries, &format!("backlog-{size}-queue.log"))?;
        let queued = async {
            let (load, webhook_ids) = self
                .start_and_load(
                    &mut queuing,
                    &credentials,
                    receiver.port(),
                    fanout,
                    &bodies,
                    self.plan(events, None),
                )
                .await?;
            self.wait_for_attempts(&mut queuing, load.deliveries_reported)
                .await?;
            self.wait_until_failed(&mut queuing, &credentials, &webhook_ids, &since, &load)
                .await?;
            anyhow::Ok((load, webhook_ids, Instant::now()))
        }
        .await;
        let queuing_rss = queuing.peak_rss_kib();
        if let Err(error) = queuing.stop().await {
            eprintln!("bench: stopping the queuing service: {error:#}");
        }
        let (load, webhook_ids, settled_at) = queued?;
        let queuing_rss_kib = queuing_rss?;

        receiver.listen()?;
        let mut draining =
            self.start_service(database, &[], &format!("backlog-{size}-drain.log"))?;
        let drained = async {
            draining
                .wait_ready(&self.client, crate::READY_TIMEOUT)
                .await?;
            eprintln!(
                "bench: requeuing {} failed deliveries",
                load.deliveries_reported
            );
            let requeue_started = Instant::now();
            let mut requeued = 0;
            for webhook_id in &webhook_ids {
                requeued += recover(
                    &self.client,
                    &draining.base_url,
                    &credentials.api_key,
                    webhook_id,
                    &since,
                    false,
                )
                .await?;
            }
            let requeue_finished = Instant::now();
            self.wait_for_deliveries(
                receiver,
                &mut draining,
                requeued,
                Duration::from_secs(self.args.timeout),
            )
            .await?;
            anyhow::Ok((requeued, requeue_started, requeue_finished))
        }
        .await;
        let draining_rss = draining.peak_rss_kib();
        if let Err(error) = draining.stop().await {
            eprintln!("bench: stopping the draining service: {error:#}");
        }
        let (requeued, requeue_started, requeue_finished) = drained?;
        let draining_rss_kib = draining_rss?;
        let recording = receiver.take_recording();
        let drain = DrainMetrics::compute(&recording, requeue_started);

        let queuing_seconds = (settled_at - load.started).as_secs_f64();
        let mut record = self.backlog_record(&format!("backlog {size}"), &load, fanout);
        record.insert("backlog_mode".into(), json!("requeued"));
        record.insert("deliveries".into(), json!(drain.delivered));
        record.insert("requeued".into(), json!(requeued));
        record.insert(
            "deliveries_per_s".into(),
            json!(round_rate(drain.per_second)),
        );
        record.insert(
            "requeue_ms".into(),
            json!(crate::stats::millis(
                (requeue_finished - requeue_started).as_micros() as i64
            )),
        );
        record.insert(
            "requeue_to_first_delivery_ms".into(),
            json!(drain.start_to_first_ms),
        );
        record.insert(
            "requeue_to_last_delivery_s".into(),
            json!(drain.start_to_last_s),
        );
        record.insert(
            "failed_first_attempts_per_s".into(),
            json!(round_rate(
                load.deliveries_reported as f64 / queuing_seconds
            )),
        );
        record.insert(
            "queuing_peak_rss_mib".into(),
            json!(mebibytes(queuing_rss_kib)),
        );
        record.insert("peak_rss_mib".into(), json!(mebibytes(draining_rss_kib)));
        record.insert("duplicates".into(), json!(recording.duplicates));
        record.insert("repeat_arrivals".into(), json!(recording.repeats));
        record.insert(
            "notes".into(),
            json!(format!(
                "drain after recover made all {requeued} failed deliveries due at once; \
                 queuing process (events accepted, first attempts refused) peaked at {} MiB",
                mebibytes(queuing_rss_kib)
            )),
        );
        Ok((record, bodies))
    }

    /// Waits until every delivery of the run is stored as failed, by
    /// requesting a dry-run count of failed deliveries from the service.
    async fn wait_until_failed(
        &self,
        service: &mut ServiceProcess,
        credentials: &Credentials,
        webhook_ids: &[String],
        since: &str,
        load: &LoadResult,
    ) -> anyhow::Result<()> {
        eprintln!(
            "bench: waiting until all {} first attempts have failed",
            load.deliveries_reported
        );
        let deadline = Instant::now() + Duration::from_secs(self.args.timeout);
        loop {
            service.check_running()?;
            let mut failed = 0;
            for webhook_id in webhook_ids {
                failed += recover(
                    &self.client,
                    &service.base_url,
                    &credentials.api_key,
                    webhook_id,
                    since,
                    true,
                )
                .await?;
            }
            if failed >= load.deliveries_reported {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {} s waiting for first attempts to fail: {failed} of {} \
                     deliveries failed; the service log is {}",
                    self.args.timeout,
                    load.deliveries_reported,
                    service.log_path.display()
                );
            }
            tokio::time::sleep(SETTLE_POLL).await;
        }
    }

    /// Accepts `size` deliveries in one process while the receiver refuses
    /// connections, waits until every first attempt has failed, then lets
    /// the receiver listen before the retry is due.
    async fn run_retried(
        &self,
        receiver: &mut Receiver,
        database: &Database,
        size: u64,
        fanout: usize,
    ) -> anyhow::Result<(Map<String, Value>, BodyFactory)> {
        let events = size.div_ceil(fanout as u64);
        let delay = Duration::from_secs(self.args.backlog_retry_delay);
        let credentials = self.create_credentials(database)?;
        let bodies = BodyFactory::new(credentials.business, self.args.body_bytes);

        let schedule = [
            "--retry-schedule".to_owned(),
            format!("{}s", delay.as_secs()),
        ];
        let mut service =
            self.start_service(database, &schedule, &format!("backlog-{size}-retried.log"))?;
        let outcome = async {
            let (load, webhook_ids) = self
                .start_and_load(
                    &mut service,
                    &credentials,
                    receiver.port(),
                    fanout,
                    &bodies,
                    self.plan(events, None),
                )
                .await?;
            self.wait_for_attempts(&mut service, load.deliveries_reported)
                .await?;
            let due = self
                .retry_due_times(&service, &credentials, &webhook_ids)
                .await?;
            // A margin of 1 s keeps the receiver's start ahead of the first retry.
            let first_due = due.values().min().copied();
            if first_due.is_some_and(|first| first <= Instant::now() + Duration::from_secs(1)) {
                bail!(
                    "the first retry fell due {:.1} s after the load started, before the \
                     receiver could listen, because accepting the events, failing their first \
                     attempts and listing them took too long; rerun with a larger \
                     --backlog-retry-delay than {} s",
                    first_due
                        .map(|first| first.saturating_duration_since(load.started))
                        .unwrap_or_default()
                        .as_secs_f64(),
                    delay.as_secs()
                );
            }
            if due.len() as u64 != load.deliveries_reported {
                bail!(
                    "the service listed {} pending deliveries with a retry time, expected {}",
                    due.len(),
                    load.deliveries_reported
                );
            }
            receiver.listen()?;
            self.wait_for_deliveries(
                receiver,
                &mut service,
                load.deliveries_reported,
                delay + Duration::from_secs(self.args.timeout),
            )
            .await?;
            anyhow::Ok((load, due))
        }
        .await;
        let peak_rss = service.peak_rss_kib();
        if let Err(error) = service.stop().await {
            eprintln!("bench: stopping the service: {error:#}");
        }
        let (load, due) = outcome?;
        let peak_rss_kib = peak_rss?;
        let recording = receiver.take_recording();
        let first_due = due.values().min().copied().unwrap_or_else(Instant::now);
        let drain = DrainMetrics::compute(&recording, first_due);
        let retries = RetryMetrics::compute(&recording, &due);

        let mut record = self.backlog_record(&format!("backlog {size} retried"), &load, fanout);
        record.insert("backlog_mode".into(), json!("retried"));
        record.insert("retry_delay_s".into(), json!(delay.as_secs()));
        record.insert("deliveries".into(), json!(drain.delivered));
        record.insert(
            "deliveries_per_s".into(),
            json!(round_rate(drain.per_second)),
        );
        record.insert(
            "retry_lateness".into(),
            json!(Summary::of(&mut retries.lateness_us.clone()).map(Summary::to_json)),
        );
        record.insert(
            "delivered_without_due_time".into(),
            json!(retries.without_due_time),
        );
        record.insert(
            "last_delivery_after_last_retry_due_s".into(),
            json!(retries.catch_up_s),
        );
        record.insert("peak_rss_mib".into(), json!(mebibytes(peak_rss_kib)));
        record.insert("duplicates".into(), json!(recording.duplicates));
        record.insert("repeat_arrivals".into(), json!(recording.repeats));
        record.insert(
            "notes".into(),
            json!(format!(
                "receiver refused connections until every first attempt had failed; retries {} s \
                 later arrived {} ms late at p99; last delivery {} s after the last retry \
                 fell due",
                delay.as_secs(),
                retries.p99_lateness_ms(),
                retries.catch_up_s
            )),
        );
        Ok((record, bodies))
    }

    /// Waits until the service has made `expected` attempts, which with the
    /// receiver refusing connections are all failed first attempts.
    async fn wait_for_attempts(
        &self,
        service: &mut ServiceProcess,
        expected: u64,
    ) -> anyhow::Result<()> {
        eprintln!("bench: waiting until all {expected} first attempts have failed");
        let deadline = Instant::now() + Duration::from_secs(self.args.timeout);
        loop {
            service.check_running()?;
            let attempts = attempts_total(&self.client, &service.base_url).await?;
            if attempts >= expected {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {} s waiting for first attempts: {attempts} of {expected} \
                     made; the service log is {}",
                    self.args.timeout,
                    service.log_path.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Reads the retry due time of every pending delivery from the
    /// service's delivery listing, on this process's monotonic clock. The
    /// attempt counter on `/metrics` grows just before an attempt is stored,
    /// so the listing is read again until every delivery shows its attempt.
    async fn retry_due_times(
        &self,
        service: &ServiceProcess,
        credentials: &Credentials,
        webhook_ids: &[String],
    ) -> anyhow::Result<HashMap<u128, Instant>> {
        let deadline = Instant::now() + Duration::from_secs(self.args.timeout);
        loop {
            let anchor = (Instant::now(), SystemTime::now());
            let mut due = HashMap::new();
            let mut unattempted = 0;
            for webhook_id in webhook_ids {
                let listed = pending_deliveries(
                    &self.client,
                    &service.base_url,
                    &credentials.api_key,
                    webhook_id,
                )
                .await?;
                for delivery in listed {
                    match delivery.next_attempt_at {
                        Some(next) if delivery.attempt_count > 0 => {
                            due.insert(delivery.id, to_instant(next, anchor));
                        }
                        _ => unattempted += 1,
                    }
                }
            }
            if unattempted == 0 {
                return Ok(due);
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {} s waiting for the first attempts to be stored: \
                     {unattempted} pending deliveries still show no attempt",
                    self.args.timeout
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts a backlog record with the producer-side figures.
    fn backlog_record(&self, label: &str, load: &LoadResult, fanout: usize) -> Map<String, Value> {
        let mut record = self.record_base(label, load.accepted, fanout);
        record.insert("producer_failures".into(), json!(load.failures));
        record.insert(
            "accepted_events_per_s".into(),
            json!(round_rate(load.accepted_per_second())),
        );
        record.insert(
            "producer_latency".into(),
            json!(Summary::of(&mut load.latencies_us.clone()).map(Summary::to_json)),
        );
        record
    }
}

/// Returns the time `minutes` ago in RFC 3339, the lower bound of `recover`.
fn rfc3339_minutes_ago(minutes: i64) -> anyhow::Result<String> {
    let time = time::OffsetDateTime::now_utc() - time::Duration::minutes(minutes);
    time.format(&time::format_description::well_known::Rfc3339)
        .context("formatting an RFC 3339 time")
}
