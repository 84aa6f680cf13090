//! `thingsgate bench provision`: what a load test needs in a Thingsgate solution, made through
//! a running server's HTTP API before the run, so that the run measures steady state, not setup.
//!
//! For each device `i` in `0..N`, named `<device prefix><i>`:
//! - policy `NS:<name>` with three entries:
//!   - `owner`: `iot-things:<solution>` — every client authenticated with a secret of the
//!     solution carries it (`Solutions::check_secret`) — READ and WRITE on `thing:/`,
//!     `policy:/`, `message:/`;
//!   - `device`: `iot-things:<solution>:<name>` (the device connecting with a secret and client
//!     ID `<name>`) and `<issuer key>:<name>` (the device connecting with a JWT of the issuer
//!     whose `key` is `bench`, `sub` = `<name>`): READ and WRITE on `thing:/features`;
//!   - `subscribers` (if `M` > 0): `iot-things:<solution>:<subscriber prefix><j>` and
//!     `<issuer key>:<subscriber prefix><j>` for `j` in `0..M`: READ on `thing:/` (`--view
//!     full`) or on `thing:/features/temp` only (`--view partial`: events cut to that view).
//!     A subscriber connecting with the secret also holds `iot-things:<solution>`, the owner,
//!     and so sees everything: partial views show only for JWT subscribers.
//! - thing `NS:<name>`: `{"policyId": "NS:<name>", "attributes": {"serial": i}, "features":
//!   {"temp": {"properties": {"value": 0}}}}`.
//!
//! Idempotent: PUT creates or replaces (counted apart: 201 or 204). The first device is made
//! alone (it checks the credentials and the namespace with one request, not a burst the
//! server's limiter would answer with 429s), the others `--concurrency` at a time over a pool of
//! kept-alive connections, each request under [`REQUEST_TIMEOUT`]. The first failure stops
//! everything: exit 2 naming the thing and the server's Ditto error. `--delete` removes the
//! things, then their policies (absent ones count as such, not as failures).
//!
//! The server must be this machine (`localhost` or a loopback address) unless `--allow-remote`:
//! N things written into a server by mistake are not a small thing to undo, and the secret
//! travels in plain HTTP.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use futures_util::StreamExt;
use serde_json::{Map, Value, json};

use crate::auth::solution::SolutionId;
use crate::http_client::{
    self, Api, BaseUrl, HttpClient, REQUEST_TIMEOUT, SECRET_ENV, secret_from_env, segment,
};

/// How many things a run may provision (a policy and a thing each).
const MAX_THINGS: u32 = 1_000_000;
/// How many subscribers a policy may name (two subjects each, in every policy).
const MAX_SUBSCRIBERS: u32 = 10_000;
/// How many requests may be in flight at once.
const MAX_CONCURRENCY: u16 = 256;
/// A progress line on stderr every this many things.
const PROGRESS_EVERY: u32 = 1_000;

/// What subscribers may read of each thing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum View {
    /// READ on `thing:/`: the whole thing, every event.
    Full,
    /// READ on `thing:/features/temp` only: retrieves and events cut to that feature (seen by
    /// JWT subscribers only: a secret client also holds the owner's subject).
    Partial,
}

impl View {
    fn as_str(self) -> &'static str {
        match self {
            View::Full => "full",
            View::Partial => "partial",
        }
    }

    /// The resource subscribers get READ on.
    fn resource(self) -> &'static str {
        match self {
            View::Full => "thing:/",
            View::Partial => "thing:/features/temp",
        }
    }
}

/// Arguments of `bench provision`.
#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Policies (per device NAME = <device prefix><i>):
  owner        iot-things:<solution>: READ, WRITE on thing:/, policy:/, message:/
  device       iot-things:<solution>:NAME (secret, client ID NAME) and <issuer key>:NAME (JWT,
               sub NAME): READ, WRITE on thing:/features
  subscribers  iot-things:<solution>:<subscriber prefix><j> and <issuer key>:<subscriber
               prefix><j>, j in 0..M: READ on thing:/ (--view full) or thing:/features/temp
               (--view partial)

A client authenticated with a secret of the solution holds iot-things:<solution> too, the owner:
it sees whole things whatever the view. Partial views show only for JWT subscribers.

The secret comes from the environment variable THINGSGATE_SECRET, never from the command line.
Running it again with the same arguments replaces what exists. Exit 2 on the first failure.")]
pub struct ProvisionArgs {
    /// The running server's HTTP API, e.g. `http://127.0.0.1:8080` (plain HTTP; this machine
    /// only unless `--allow-remote`). Authenticated as the solution with the secret in the
    /// environment variable THINGSGATE_SECRET.
    #[arg(long, value_name = "URL")]
    pub http: String,
    /// The solution ID.
    #[arg(long)]
    pub solution: String,
    /// The namespace of the things and policies (one the solution owns).
    #[arg(long, value_name = "NS")]
    pub namespace: String,
    /// How many devices: things and policies `NS:<device prefix><i>` for i in 0..N.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_THINGS)))]
    pub things: u32,
    /// Names of the devices (and their things, policies and client IDs): `<prefix><i>`.
    #[arg(long, default_value = "dev-", value_name = "PREFIX")]
    pub device_prefix: String,
    /// How many subscribers every policy lets read: `<subscriber prefix><j>` for j in 0..M.
    #[arg(long, default_value_t = 0, value_name = "M", value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_SUBSCRIBERS)))]
    pub subscribers: u32,
    /// Names of the subscribers (their client IDs or JWT `sub`): `<prefix><j>`.
    #[arg(long, default_value = "sub-", value_name = "PREFIX")]
    pub subscriber_prefix: String,
    /// What subscribers may read: the whole thing, or only feature `temp` (a partial view:
    /// events cut; shows for JWT subscribers only).
    #[arg(long, value_enum, default_value_t = View::Full)]
    pub view: View,
    /// The `key` of the JWT issuer devices and subscribers may connect with: their subjects are
    /// `<key>:<name>`.
    #[arg(long, default_value = "bench", value_name = "KEY")]
    pub issuer_key: String,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 16, value_name = "C", value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_CONCURRENCY)))]
    pub concurrency: u16,
    /// One JSON object on stdout at the end, and no progress on stderr.
    #[arg(long)]
    pub json: bool,
    /// Allow a server that is not this machine (`localhost` or a loopback address).
    #[arg(long)]
    pub allow_remote: bool,
    /// Remove the things and policies instead (absent ones are no failure).
    #[arg(long)]
    pub delete: bool,
}

/// What a PUT did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Put {
    Created,
    Replaced,
}

/// What a DELETE did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Removed {
    Deleted,
    Absent,
}

/// One device provisioned: what happened to its policy and its thing.
#[derive(Debug, Clone, Copy)]
struct Provisioned {
    policy: Put,
    thing: Put,
}

/// One device removed.
#[derive(Debug, Clone, Copy)]
struct Deprovisioned {
    thing: Removed,
    policy: Removed,
}

/// The run: the API, what to make, and the parts of every policy that are the same.
struct Plan {
    api: Api,
    client: HttpClient,
    namespace: String,
    device_prefix: String,
    issuer_key: String,
    /// The `subscribers` entry, identical in every policy (`None` without subscribers).
    subscribers: Option<Value>,
}

/// Runs `bench provision`.
pub fn main(args: ProvisionArgs) -> anyhow::Result<ExitCode> {
    let solution = SolutionId::parse(&args.solution)?;
    let base = BaseUrl::parse(&args.http, "thingsgate bench provision")?;
    if !args.allow_remote && !base.is_loopback() {
        bail!(
            "`--http`: `{}` is not this machine; `bench provision` writes {} things and policies \
             (and sends {SECRET_ENV} over plain HTTP): pass `--allow-remote` if you mean it",
            base.host(),
            args.things
        );
    }
    check_names(&args)?;
    let api = Api::new(base, &solution, secret_from_env)?;
    let concurrency = usize::from(args.concurrency);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the HTTP client")?;
    let subscribers = (args.subscribers > 0).then(|| {
        subscribers_entry(
            &solution,
            &args.issuer_key,
            &args.subscriber_prefix,
            args.subscribers,
            args.view,
        )
    });
    let started = Instant::now();
    let summary = runtime.block_on(async {
        let plan = Plan {
            api,
            client: http_client::client(concurrency),
            namespace: args.namespace.clone(),
            device_prefix: args.device_prefix.clone(),
            issuer_key: args.issuer_key.clone(),
            subscribers,
        };
        if args.delete {
            plan.delete_all(args.things, concurrency, !args.json, started)
                .await
        } else {
            plan.provision_all(args.things, concurrency, !args.json, started)
                .await
        }
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let rate = per_second(args.things, started.elapsed());
    let mut out = std::io::stdout().lock();
    match summary {
        Summary::Provisioned {
            things_created,
            things_replaced,
            policies_created,
            policies_replaced,
        } => {
            if args.json {
                let summary = json!({
                    "solutionId": solution.as_str(),
                    "namespace": args.namespace,
                    "things": args.things,
                    "created": things_created,
                    "replaced": things_replaced,
                    "policiesCreated": policies_created,
                    "policiesReplaced": policies_replaced,
                    "subscribers": args.subscribers,
                    "view": args.view.as_str(),
                    "seconds": seconds,
                    "thingsPerSecond": rate,
                });
                writeln!(out, "{summary}")?;
            } else {
                writeln!(
                    out,
                    "provisioned {} things in {} ({things_created} created, {things_replaced} \
                     replaced), {} subscribers with a {} view, in {seconds:.2} s ({rate:.0} \
                     things/s)",
                    args.things,
                    args.namespace,
                    args.subscribers,
                    args.view.as_str(),
                )?;
            }
        }
        Summary::Deleted {
            things_deleted,
            things_absent,
            policies_deleted,
        } => {
            if args.json {
                let summary = json!({
                    "solutionId": solution.as_str(),
                    "namespace": args.namespace,
                    "things": args.things,
                    "deleted": things_deleted,
                    "absent": things_absent,
                    "policiesDeleted": policies_deleted,
                    "seconds": seconds,
                    "thingsPerSecond": rate,
                });
                writeln!(out, "{summary}")?;
            } else {
                writeln!(
                    out,
                    "deleted {things_deleted} of {} things in {} ({things_absent} were absent) \
                     and {policies_deleted} policies, in {seconds:.2} s ({rate:.0} things/s)",
                    args.things, args.namespace,
                )?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Refuses names that would make an invalid thing ID (the first and the longest), or an
/// issuer key that is no subject prefix.
fn check_names(args: &ProvisionArgs) -> anyhow::Result<()> {
    let last = args.things.saturating_sub(1);
    for i in [0, last] {
        let id = format!("{}:{}{i}", args.namespace, args.device_prefix);
        twin::ThingId::parse(&id)
            .map_err(|e| anyhow!("`--namespace`/`--device-prefix` make thing ID `{id}`: {e}"))?;
    }
    if args.issuer_key.is_empty() || args.issuer_key.contains(':') {
        bail!(
            "`--issuer-key {}`: an issuer key is not empty and has no `:`",
            args.issuer_key
        );
    }
    if args.subscriber_prefix.is_empty() && args.subscribers > 0 {
        bail!("`--subscriber-prefix` must not be empty");
    }
    Ok(())
}

/// Things per second, for the summary and progress lines.
fn per_second(things: u32, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds > 0.0 {
        f64::from(things) / seconds
    } else {
        0.0
    }
}

/// What a whole run did.
enum Summary {
    Provisioned {
        things_created: u32,
        things_replaced: u32,
        policies_created: u32,
        policies_replaced: u32,
    },
    Deleted {
        things_deleted: u32,
        things_absent: u32,
        policies_deleted: u32,
    },
}

/// The `subscribers` entry: READ on the view's resource for both subjects of each subscriber.
fn subscribers_entry(
    solution: &SolutionId,
    issuer_key: &str,
    prefix: &str,
    count: u32,
    view: View,
) -> Value {
    let secret_subject = solution.subject();
    let mut subjects = Map::new();
    for j in 0..count {
        subjects.insert(
            format!("{secret_subject}:{prefix}{j}"),
            json!({"type": "bench subscriber (secret)"}),
        );
        subjects.insert(
            format!("{issuer_key}:{prefix}{j}"),
            json!({"type": "bench subscriber (JWT)"}),
        );
    }
    json!({
        "subjects": subjects,
        "resources": {view.resource(): {"grant": ["READ"], "revoke": []}}
    })
}

impl Plan {
    /// The device name of index `i`.
    fn name(&self, i: u32) -> String {
        format!("{}{i}", self.device_prefix)
    }

    /// The policy of device `name`.
    fn policy(&self, name: &str) -> Value {
        let all = json!({"grant": ["READ", "WRITE"], "revoke": []});
        let secret_subject = self.api.solution().subject();
        let mut entries = Map::new();
        entries.insert(
            "owner".into(),
            json!({
                "subjects": {secret_subject.clone(): {"type": "solution"}},
                "resources": {"thing:/": all, "policy:/": all, "message:/": all}
            }),
        );
        entries.insert(
            "device".into(),
            json!({
                "subjects": {
                    format!("{secret_subject}:{name}"): {"type": "bench device (secret)"},
                    format!("{}:{name}", self.issuer_key): {"type": "bench device (JWT)"},
                },
                "resources": {"thing:/features": all}
            }),
        );
        if let Some(subscribers) = &self.subscribers {
            entries.insert("subscribers".into(), subscribers.clone());
        }
        json!({ "entries": entries })
    }

    /// The URL of `/api/2/{things|policies}/NS:<name>`.
    fn url(&self, kind: &str, name: &str) -> String {
        format!(
            "{}/api/2/{kind}/{}:{}",
            self.api.base(),
            segment(&self.namespace),
            segment(name)
        )
    }

    /// `method url` under [`REQUEST_TIMEOUT`]: the status, or what the server refused (its
    /// Ditto error), or why it could not be asked. `absent_ok`: a 404 is an answer, not an
    /// error.
    async fn request(
        &self,
        method: hyper::Method,
        url: &str,
        body: Option<Vec<u8>>,
        absent_ok: bool,
    ) -> anyhow::Result<hyper::StatusCode> {
        let sent = tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.api.send(&self.client, method.clone(), url, body),
        )
        .await
        .map_err(|_| anyhow!("no answer within {REQUEST_TIMEOUT:?} ({method} {url})"))?;
        let (status, bytes) = sent?;
        if status.is_success() || (absent_ok && status == hyper::StatusCode::NOT_FOUND) {
            return Ok(status);
        }
        Err(anyhow::Error::new(self.api.refusal(status, &bytes)))
    }

    /// PUT of `body` at `url`: created (201) or replaced (any other success).
    async fn put(&self, url: &str, body: &Value) -> anyhow::Result<Put> {
        let body = serde_json::to_vec(body)?;
        let status = self
            .request(hyper::Method::PUT, url, Some(body), false)
            .await?;
        Ok(if status == hyper::StatusCode::CREATED {
            Put::Created
        } else {
            Put::Replaced
        })
    }

    /// DELETE of `url`: deleted, or absent (404).
    async fn delete(&self, url: &str) -> anyhow::Result<Removed> {
        let status = self.request(hyper::Method::DELETE, url, None, true).await?;
        Ok(if status == hyper::StatusCode::NOT_FOUND {
            Removed::Absent
        } else {
            Removed::Deleted
        })
    }

    /// Policy, then thing, of device `i`; an error names the thing.
    async fn provision_one(&self, i: u32) -> anyhow::Result<Provisioned> {
        let name = self.name(i);
        let id = format!("{}:{name}", self.namespace);
        let policy = self
            .put(&self.url("policies", &name), &self.policy(&name))
            .await
            .with_context(|| format!("thing `{id}`: its policy `{id}` was not stored"))?;
        let thing = json!({
            "policyId": id,
            "attributes": {"serial": i},
            "features": {"temp": {"properties": {"value": 0}}},
        });
        let thing = self
            .put(&self.url("things", &name), &thing)
            .await
            .with_context(|| format!("thing `{id}` was not stored"))?;
        Ok(Provisioned { policy, thing })
    }

    /// Thing, then policy, of device `i`; an error names the thing.
    async fn delete_one(&self, i: u32) -> anyhow::Result<Deprovisioned> {
        let name = self.name(i);
        let id = format!("{}:{name}", self.namespace);
        let thing = self
            .delete(&self.url("things", &name))
            .await
            .with_context(|| format!("thing `{id}` was not deleted"))?;
        let policy = self
            .delete(&self.url("policies", &name))
            .await
            .with_context(|| format!("thing `{id}`: its policy `{id}` was not deleted"))?;
        Ok(Deprovisioned { thing, policy })
    }

    /// Devices `0..things`: the first alone, then `concurrency` at a time; stops at the first
    /// failure.
    async fn provision_all(
        &self,
        things: u32,
        concurrency: usize,
        progress: bool,
        started: Instant,
    ) -> anyhow::Result<Summary> {
        let mut counts = [0u32; 4];
        self.each_device(
            things,
            concurrency,
            |i| self.provision_one(i),
            |p: Provisioned, done| {
                let [tc, tr, pc, pr] = &mut counts;
                match p.thing {
                    Put::Created => *tc += 1,
                    Put::Replaced => *tr += 1,
                }
                match p.policy {
                    Put::Created => *pc += 1,
                    Put::Replaced => *pr += 1,
                }
                report_progress(progress, "provisioned", done, things, started);
            },
        )
        .await?;
        let [
            things_created,
            things_replaced,
            policies_created,
            policies_replaced,
        ] = counts;
        Ok(Summary::Provisioned {
            things_created,
            things_replaced,
            policies_created,
            policies_replaced,
        })
    }

    /// `one` for devices `0..things`: the first alone (a wrong secret gives one clean 401,
    /// not a burst the server's limiter slows), then `concurrency` at a time; `count` gets
    /// each result and how many are done. Stops at the first failure.
    async fn each_device<T, Fut>(
        &self,
        things: u32,
        concurrency: usize,
        one: impl Fn(u32) -> Fut,
        mut count: impl FnMut(T, u32),
    ) -> anyhow::Result<()>
    where
        Fut: std::future::Future<Output = anyhow::Result<T>>,
    {
        let mut done = 0u32;
        if things == 0 {
            return Ok(());
        }
        let first = one(0).await?;
        done += 1;
        count(first, done);
        let mut rest = futures_util::stream::iter(1..things)
            .map(&one)
            .buffer_unordered(concurrency);
        while let Some(result) = rest.next().await {
            let value = result.map_err(|e| stopped(e, done, things))?;
            done += 1;
            count(value, done);
        }
        Ok(())
    }

    /// Removes devices `0..things`, like [`Plan::provision_all`].
    async fn delete_all(
        &self,
        things: u32,
        concurrency: usize,
        progress: bool,
        started: Instant,
    ) -> anyhow::Result<Summary> {
        let (mut deleted, mut absent, mut policies) = (0u32, 0u32, 0u32);
        self.each_device(
            things,
            concurrency,
            |i| self.delete_one(i),
            |d: Deprovisioned, done| {
                match d.thing {
                    Removed::Deleted => deleted += 1,
                    Removed::Absent => absent += 1,
                }
                if d.policy == Removed::Deleted {
                    policies += 1;
                }
                report_progress(progress, "deleted", done, things, started);
            },
        )
        .await?;
        Ok(Summary::Deleted {
            things_deleted: deleted,
            things_absent: absent,
            policies_deleted: policies,
        })
    }
}

/// A failure after `done` devices: says so, and that running again is safe.
fn stopped(error: anyhow::Error, done: u32, things: u32) -> anyhow::Error {
    error.context(format!(
        "stopped after {done} of {things} things (running the same command again is safe)"
    ))
}

/// A progress line on stderr every [`PROGRESS_EVERY`] things (and at the end of a long run).
fn report_progress(progress: bool, verb: &str, done: u32, things: u32, started: Instant) {
    let at_step = done.is_multiple_of(PROGRESS_EVERY);
    let last_of_a_long_run = done == things && things > PROGRESS_EVERY;
    if !progress || !(at_step || last_of_a_long_run) {
        return;
    }
    let rate = per_second(done, started.elapsed());
    eprintln!("{verb} {done}/{things} things ({rate:.0} things/s)");
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;

    fn plan(subscribers: u32, view: View) -> Plan {
        let solution = SolutionId::parse("acme").unwrap();
        let base = BaseUrl::parse("127.0.0.1:1", "x").unwrap();
        Plan {
            api: Api::new(base, &solution, |_| Ok("s".to_owned())).unwrap(),
            client: http_client::client(1),
            namespace: "org.acme".into(),
            device_prefix: "dev-".into(),
            issuer_key: "bench".into(),
            subscribers: (subscribers > 0)
                .then(|| subscribers_entry(&solution, "bench", "sub-", subscribers, view)),
        }
    }

    #[test]
    fn a_policy_names_the_owner_the_device_both_ways_and_each_subscriber_both_ways() {
        let p = plan(2, View::Partial).policy("dev-3");
        let entries = &p["entries"];
        assert!(entries["owner"]["subjects"]["iot-things:acme"].is_object());
        assert_eq!(
            entries["owner"]["resources"]["policy:/"]["grant"],
            json!(["READ", "WRITE"])
        );
        let device = entries["device"]["subjects"].as_object().unwrap();
        assert!(device.contains_key("iot-things:acme:dev-3") && device.contains_key("bench:dev-3"));
        assert_eq!(device.len(), 2);
        let subscribers = entries["subscribers"]["subjects"].as_object().unwrap();
        assert_eq!(subscribers.len(), 4);
        assert!(subscribers.contains_key("iot-things:acme:sub-1"));
        assert!(subscribers.contains_key("bench:sub-0"));
        assert_eq!(
            entries["subscribers"]["resources"],
            json!({"thing:/features/temp": {"grant": ["READ"], "revoke": []}})
        );
        assert!(
            plan(0, View::Full).policy("dev-0")["entries"]
                .get("subscribers")
                .is_none()
        );
    }

    #[test]
    fn ids_are_percent_encoded_in_urls() {
        let p = plan(0, View::Full);
        assert_eq!(
            p.url("things", "dev-1"),
            "http://127.0.0.1:1/api/2/things/org.acme:dev-1"
        );
    }
}
