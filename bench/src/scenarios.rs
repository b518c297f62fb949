//! The scenarios: each starts its own database, service and receiver, runs
//! the load, waits for every delivery and returns one JSON record per
//! measured run.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::driver::{self, BodyFactory, LoadPlan, LoadResult, Target};
use crate::metrics::{FlowMetrics, mebibytes};
use crate::postgres::Schema;
use crate::receiver::{Receiver, free_port};
use crate::service::{ServiceBinary, ServiceProcess, register_webhooks};
use crate::stats::{Summary, round_rate};
use crate::{Args, DatabaseKind, READY_TIMEOUT, Scenario};

/// The endpoint that never responds in the hanging scenario.
const HANGING_ENDPOINT: u16 = 0;

pub struct Bench {
    pub args: Args,
    binary: ServiceBinary,
    work_dir: PathBuf,
    machine: Value,
    /// Client for management calls and readiness checks.
    pub(crate) client: reqwest::Client,
}

/// A database that only this run uses.
pub(crate) struct Database {
    pub(crate) url: String,
    schema: Option<Schema>,
}

impl Database {
    pub(crate) async fn dispose(self) {
        if let Some(schema) = self.schema {
            let name = schema.name.clone();
            if let Err(error) = schema.drop().await {
                eprintln!("bench: dropping the PostgreSQL schema {name} failed: {error:#}");
            }
        }
    }
}

pub(crate) struct Credentials {
    pub(crate) business: Uuid,
    pub(crate) api_key: String,
    producer_token: String,
}

/// A run at full speed or at a fixed rate.
struct FlowSpec {
    label: &'static str,
    events: u64,
    fanout: usize,
    rate: Option<f64>,
    hanging: bool,
}

impl Bench {
    pub fn new(
        args: Args,
        binary: ServiceBinary,
        work_dir: PathBuf,
        machine: Value,
    ) -> anyhow::Result<Bench> {
        Ok(Bench {
            args,
            binary,
            work_dir,
            machine,
            client: driver::client(4)?,
        })
    }

    /// Runs the chosen scenario and prints each record as one JSON line.
    pub async fn run(&self) -> anyhow::Result<Vec<Value>> {
        let records = match self.args.scenario {
            Scenario::Fanout10 => vec![self.run_flow(self.flow_spec("fanout10", 2_000, 10)).await?],
            Scenario::Fanout1 => vec![self.run_flow(self.flow_spec("fanout1", 20_000, 1)).await?],
            Scenario::Steady1000 => {
                let mut spec = self.flow_spec("steady1000", 10_000, 1);
                spec.rate = Some(self.args.rate.unwrap_or(1_000.0));
                vec![self.run_flow(spec).await?]
            }
            Scenario::Hanging => {
                let mut spec = self.flow_spec("hanging", 2_000, 10);
                spec.hanging = true;
                vec![self.run_flow(spec).await?]
            }
            Scenario::Backlog => self.run_backlog().await?,
        };
        Ok(records)
    }

    fn flow_spec(&self, label: &'static str, events: u64, fanout: usize) -> FlowSpec {
        FlowSpec {
            label,
            events: self.args.events.unwrap_or(events),
            fanout: self.args.fanout.unwrap_or(fanout),
            rate: self.args.rate,
            hanging: false,
        }
    }

    pub(crate) fn plan(&self, events: u64, rate: Option<f64>) -> LoadPlan {
        let window = self
            .args
            .duration
            .map(Duration::from_secs_f64)
            .unwrap_or(Duration::from_secs(self.args.timeout));
        LoadPlan {
            events,
            concurrency: self.args.concurrency,
            rate,
            send_window: window,
        }
    }

    pub(crate) async fn fresh_database(&self, name: &str) -> anyhow::Result<Database> {
        match self.args.database {
            DatabaseKind::Sqlite => {
                let folder = self.work_dir.join(name);
                std::fs::create_dir_all(&folder)
                    .with_context(|| format!("creating {}", folder.display()))?;
                Ok(Database {
                    url: format!("sqlite://{}", folder.join("bench.db").display()),
                    schema: None,
                })
            }
            DatabaseKind::Postgres => {
                let schema = Schema::create(&self.args.postgres_url).await?;
                eprintln!("bench: created PostgreSQL schema {}", schema.name);
                Ok(Database {
                    url: schema.service_url(),
                    schema: Some(schema),
                })
            }
        }
    }

    pub(crate) fn create_credentials(&self, database: &Database) -> anyhow::Result<Credentials> {
        let business = Uuid::new_v4();
        self.binary.migrate(&database.url)?;
        let api_key = self.binary.create_api_key(business, &database.url)?;
        let producer_token = self.binary.create_producer_token(&database.url)?;
        Ok(Credentials {
            business,
            api_key,
            producer_token,
        })
    }

    pub(crate) fn start_service(
        &self,
        database: &Database,
        extra_args: &[String],
        log_name: &str,
    ) -> anyhow::Result<ServiceProcess> {
        ServiceProcess::start(
            &self.binary,
            &database.url,
            free_port()?,
            extra_args,
            &self.work_dir,
            self.work_dir.join(log_name),
        )
    }

    /// Starts a service, registers the webhooks and sends the events.
    pub(crate) async fn start_and_load(
        &self,
        service: &mut ServiceProcess,
        credentials: &Credentials,
        receiver_port: u16,
        fanout: usize,
        bodies: &BodyFactory,
        plan: LoadPlan,
    ) -> anyhow::Result<(LoadResult, Vec<String>)> {
        service.wait_ready(&self.client, READY_TIMEOUT).await?;
        let webhook_ids = register_webhooks(
            &self.client,
            &service.base_url,
            &credentials.api_key,
            receiver_port,
            fanout,
        )
        .await?;
        let target = Target::Producer {
            url: format!("{}/v1/events", service.base_url),
            token: credentials.producer_token.clone(),
        };
        eprintln!(
            "bench: sending {} events ({} in flight{})",
            plan.events,
            plan.concurrency,
            plan.rate
                .map(|rate| format!(", {rate} per second"))
                .unwrap_or_default()
        );
        let load = driver::run(&driver::client(plan.concurrency)?, &target, bodies, plan).await;
        if load.accepted == 0 {
            bail!(
                "the service accepted none of {} events; first failure: {}",
                load.sent,
                load.first_failure.as_deref().unwrap_or("none recorded")
            );
        }
        if let Some(failure) = &load.first_failure {
            eprintln!(
                "bench: {} of {} events failed; first failure: {failure}",
                load.failures, load.sent
            );
        }
        Ok((load, webhook_ids))
    }

    /// Waits until `expected` deliveries got a 204 response.
    pub(crate) async fn wait_for_deliveries(
        &self,
        receiver: &Receiver,
        service: &mut ServiceProcess,
        expected: u64,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        eprintln!("bench: waiting for {expected} deliveries");
        let deadline = Instant::now() + timeout;
        loop {
            let delivered = receiver.delivered();
            if delivered >= expected {
                return Ok(());
            }
            service.check_running()?;
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {} s waiting for deliveries: {delivered} of {expected} \
                     arrived; the service log is {}",
                    timeout.as_secs(),
                    service.log_path.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends raw requests of the same bodies straight to the receiver at the
    /// same concurrency, which measures the most requests per second that
    /// this driver and receiver reach on this machine.
    pub(crate) async fn measure_ceiling(
        &self,
        receiver: &Receiver,
        bodies: &BodyFactory,
        deliveries: u64,
    ) -> anyhow::Result<Value> {
        let requests = self.args.ceiling_requests.min(deliveries).max(1);
        let target = Target::Raw {
            url: format!("http://127.0.0.1:{}/raw", receiver.port()),
        };
        let plan = LoadPlan {
            events: requests,
            concurrency: self.args.concurrency,
            rate: None,
            send_window: Duration::from_secs(self.args.timeout),
        };
        eprintln!("bench: measuring the ceiling with {requests} raw requests");
        let result = driver::run(&driver::client(plan.concurrency)?, &target, bodies, plan).await;
        let received = receiver.raw_requests();
        let recording = receiver.take_recording();
        let mut latencies = result.latencies_us.clone();
        Ok(json!({
            "requests": result.accepted,
            "concurrency": plan.concurrency,
            "requests_per_s": round_rate(result.accepted_per_second()),
            "request_latency": Summary::of(&mut latencies).map(Summary::to_json),
            "received": received,
            "received_without_seq": recording.missing_seq,
            "failures": result.failures,
        }))
    }

    pub(crate) fn record_base(
        &self,
        label: &str,
        events: u64,
        fanout: usize,
    ) -> serde_json::Map<String, Value> {
        let date = time::OffsetDateTime::now_utc()
            .format(time::macros::format_description!("[year]-[month]-[day]"))
            .unwrap_or_default();
        let mut record = serde_json::Map::new();
        record.insert("scenario".into(), json!(label_scenario(self.args.scenario)));
        record.insert("label".into(), json!(label));
        record.insert("database".into(), json!(self.args.database.name()));
        record.insert("date".into(), json!(date));
        record.insert("events".into(), json!(events));
        record.insert("fanout".into(), json!(fanout));
        record.insert("body_bytes".into(), json!(self.args.body_bytes));
        record.insert("concurrency".into(), json!(self.args.concurrency));
        record.insert("machine".into(), self.machine.clone());
        if let Some(wrapper) = &self.args.service_wrapper {
            record.insert("service_wrapper".into(), json!(wrapper));
        }
        record
    }

    async fn run_flow(&self, spec: FlowSpec) -> anyhow::Result<Value> {
        let hanging_endpoint = spec.hanging.then_some(HANGING_ENDPOINT);
        let mut receiver = Receiver::reserve(hanging_endpoint)?;
        receiver.listen()?;
        let database = self.fresh_database(spec.label).await?;
        let outcome = self.run_flow_on(&receiver, &database, &spec).await;
        receiver.shutdown();
        database.dispose().await;
        let record = outcome?;
        println!("{record}");
        Ok(record)
    }

    async fn run_flow_on(
        &self,
        receiver: &Receiver,
        database: &Database,
        spec: &FlowSpec,
    ) -> anyhow::Result<Value> {
        let credentials = self.create_credentials(database)?;
        let bodies = BodyFactory::new(credentials.business, self.args.body_bytes);
        let mut service = self.start_service(database, &[], &format!("{}.log", spec.label))?;
        let (load, _) = self
            .start_and_load(
                &mut service,
                &credentials,
                receiver.port(),
                spec.fanout,
                &bodies,
                self.plan(spec.events, spec.rate),
            )
            .await?;
        // Every event has exactly one delivery to the hanging endpoint.
        let expected = if spec.hanging {
            load.deliveries_reported - load.accepted
        } else {
            load.deliveries_reported
        };
        let waited = self
            .wait_for_deliveries(
                receiver,
                &mut service,
                expected,
                Duration::from_secs(self.args.timeout),
            )
            .await;
        let peak_rss = service.peak_rss_kib();
        let released_at = Instant::now();
        receiver.release_held();
        let stopped = service.stop().await;
        waited?;
        let peak_rss_kib = peak_rss?;
        if let Err(error) = stopped {
            eprintln!("bench: stopping the service: {error:#}");
        }

        let recording = receiver.take_recording();
        let ceiling = self.measure_ceiling(receiver, &bodies, expected).await?;
        let flow = FlowMetrics::compute(
            &recording,
            &load,
            spec.hanging.then_some(HANGING_ENDPOINT),
            released_at,
        );

        let mut record = self.record_base(spec.label, load.accepted, spec.fanout);
        record.insert("rate".into(), json!(spec.rate));
        record.insert("producer_failures".into(), json!(load.failures));
        record.insert("deliveries".into(), json!(flow.delivered));
        record.insert(
            "deliveries_per_s".into(),
            json!(round_rate(flow.deliveries_per_s)),
        );
        record.insert(
            "accepted_events_per_s".into(),
            json!(round_rate(load.accepted_per_second())),
        );
        record.insert("first_attempt_latency".into(), flow.latency_json());
        record.insert(
            "first_attempt_before_accept".into(),
            json!(flow.before_accept),
        );
        let mut producer = load.latencies_us.clone();
        record.insert(
            "producer_latency".into(),
            json!(Summary::of(&mut producer).map(Summary::to_json)),
        );
        record.insert("peak_rss_mib".into(), json!(mebibytes(peak_rss_kib)));
        record.insert("duplicates".into(), json!(recording.duplicates));
        record.insert("repeat_arrivals".into(), json!(recording.repeats));
        record.insert(
            "arrivals_without_delivery_id".into(),
            json!(recording.missing_delivery_id),
        );
        record.insert("ceiling".into(), ceiling);
        let notes = if spec.hanging {
            record.insert("hanging_endpoint".into(), flow.hanging_json());
            format!(
                "latency of the {} other endpoints; /k{HANGING_ENDPOINT} held {} requests",
                spec.fanout - 1,
                flow.hanging_arrivals
            )
        } else {
            String::new()
        };
        record.insert("notes".into(), json!(notes));
        Ok(Value::Object(record))
    }
}

fn label_scenario(scenario: Scenario) -> &'static str {
    match scenario {
        Scenario::Fanout10 => "fanout10",
        Scenario::Fanout1 => "fanout1",
        Scenario::Steady1000 => "steady1000",
        Scenario::Backlog => "backlog",
        Scenario::Hanging => "hanging",
    }
}
