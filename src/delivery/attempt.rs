//! One automatic attempt from start to record, and what it reports.

use std::time::Duration;

use super::retry::{next_delay, random_fraction};
use super::sender::AttemptOutcome;
use super::{DeliveryContext, micros};
use crate::domain::clock::now_micros;
use crate::metrics::{AttemptLabels, OutcomeLabels, metrics, status_class};
use crate::store::{AttemptRecord, Job, Trigger};

/// Renews the lease of a job that waited long enough for its lease to run
/// short. Returns false when the job must not be sent: another worker took
/// the delivery over, or the delivery ended meanwhile.
pub(super) async fn hold_lease(context: &DeliveryContext, job: &Job) -> bool {
    let now = now_micros();
    if now + micros(context.request_timeout + Duration::from_secs(5)) <= job.lease_until {
        return true;
    }
    let until = context.lease_until(now);
    let renewing = context
        .store
        .renew_lease(job.key(), context.owner.clone(), until);
    match Box::pin(renewing).await {
        Ok(renewed) => renewed,
        Err(error) => {
            tracing::error!(%error, delivery.id = %job.delivery_id, "renewing a lease failed");
            false
        }
    }
}

/// Builds the record of an attempt, with the retry decision for automatic ones.
pub fn attempt_record(
    context: &DeliveryContext,
    job: &Job,
    outcome: &AttemptOutcome,
) -> AttemptRecord {
    let succeeded = outcome.succeeded();
    let retry_at = if succeeded || job.trigger != Trigger::Automatic {
        None
    } else {
        next_delay(
            &context.retry_schedule,
            job.auto_attempts + 1,
            outcome.retry_after,
            random_fraction(),
        )
        .map(|delay| now_micros() + micros(delay))
    };
    observe_attempt(job, outcome, succeeded, retry_at.is_none());
    AttemptRecord {
        delivery_id: job.delivery_id,
        webhook_id: job.webhook_id,
        trigger: job.trigger,
        owner: (job.trigger == Trigger::Automatic).then(|| context.owner.clone()),
        started_at: outcome.started_at_micros,
        duration_ms: outcome.duration_ms,
        status_code: outcome.status_code,
        error_kind: outcome.error_kind,
        response_body: outcome.response_body.clone(),
        succeeded,
        retry_at,
    }
}

fn observe_attempt(job: &Job, outcome: &AttemptOutcome, succeeded: bool, final_attempt: bool) {
    let metrics = metrics();
    metrics
        .attempts
        .get_or_create(&AttemptLabels {
            status_class: status_class(outcome.status_code),
            error_kind: outcome.error_kind.map_or("none", |kind| kind.as_str()),
            trigger: job.trigger.as_str(),
        })
        .inc();
    metrics
        .attempt_duration
        .observe(outcome.duration_ms as f64 / 1000.0);
    if job.trigger == Trigger::Automatic && final_attempt {
        let outcome = if succeeded { "succeeded" } else { "failed" };
        metrics
            .deliveries_finished
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }
}

pub(super) fn log_outcome(job: &Job, outcome: &AttemptOutcome, record: &AttemptRecord) {
    let attempt = job.auto_attempts + 1;
    let error_kind = outcome.error_kind.map(|kind| kind.as_str());
    if record.succeeded {
        tracing::debug!(
            webhook.id = %job.webhook_id, delivery.id = %job.delivery_id,
            event.id = %job.event_id, attempt, "delivered"
        );
    } else if record.retry_at.is_some() {
        tracing::warn!(
            webhook.id = %job.webhook_id, delivery.id = %job.delivery_id,
            event.id = %job.event_id, attempt,
            status = outcome.status_code, error_kind, "attempt failed; retry scheduled"
        );
    } else {
        tracing::warn!(
            webhook.id = %job.webhook_id, delivery.id = %job.delivery_id,
            event.id = %job.event_id, attempt,
            status = outcome.status_code, error_kind, "attempt failed; no retries left"
        );
    }
}
