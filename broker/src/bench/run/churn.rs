//! `--policy-churn SECONDS`: policy changes during the run, so that a load test measures the
//! broker while it recompiles policies and re-checks the live sessions they govern (the
//! load-generator issue: "a mix of devices, apps with partial views and policy changes during
//! the run").
//!
//! While devices publish, every SECONDS one device's policy `NS:<device>` (as `bench
//! provision` makes it: the policy ID is the thing ID) gets its entry [`ENTRY`] written
//! through Thingsgate's HTTP API, round-robin over the devices. The entry's only subject is
//! [`SUBJECT`], which no client of the run holds, and its grant alternates between READ and
//! READ + WRITE on a resource no message touches: each change is a new policy revision the
//! broker must compile and apply to the sessions of the thing, but what the run's devices and
//! subscribers may do never changes — a message lost during churn is the broker's doing.
//!
//! One request at a time (a change that takes longer than the period delays the next rather
//! than piling up), each under [`REQUEST_TIMEOUT`]; a failure is counted and the churn goes
//! on. The report gives the changes made, the failures (and the first one's reason) and the
//! HTTP round trip's p50 and max.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

use crate::auth::solution::SolutionId;
use crate::http_client::{
    self, Api, BaseUrl, HttpClient, REQUEST_TIMEOUT, secret_from_env, segment,
};

/// The policy entry the churn writes.
pub(super) const ENTRY: &str = "bench-churn";
/// The entry's one subject: no client of the run (nor, by its prefix, of any issuer or
/// solution the run uses) holds it.
pub(super) const SUBJECT: &str = "bench-churn:nobody";
/// The longest period.
const MAX_PERIOD: f64 = 3600.0;

/// `--policy-churn` checked: the period and the API to call.
#[derive(Debug)]
pub(super) struct ChurnSettings {
    pub(super) every: Duration,
    pub(super) api: Arc<Api>,
}

/// What `--policy-churn` needs from the rest of the settings.
#[derive(Debug)]
pub(super) struct ChurnInput<'a> {
    pub(super) every: Option<f64>,
    pub(super) http: Option<String>,
    /// `--solution`: the HTTP API is called as this solution.
    pub(super) solution: Option<&'a str>,
    pub(super) twin: Option<&'a str>,
    pub(super) devices: usize,
    pub(super) allow_remote: bool,
}

/// Checks `--policy-churn` and `--http` (bad input is an error: exit 2 before the run). The
/// secret comes from THINGSGATE_SECRET, as for `--solution` and `bench provision`.
pub(super) fn settings(input: ChurnInput<'_>) -> anyhow::Result<Option<ChurnSettings>> {
    let Some(every) = input.every else {
        if input.http.is_some() {
            bail!("--http is the HTTP API of --policy-churn; it needs --policy-churn SECONDS");
        }
        return Ok(None);
    };
    if !every.is_finite() || every <= 0.0 || every > MAX_PERIOD {
        bail!("--policy-churn `{every}` must be more than 0 and at most {MAX_PERIOD} seconds");
    }
    let Some(http) = input.http else {
        bail!("--policy-churn needs --http URL, the HTTP API of the Thingsgate under test");
    };
    if input.twin.is_none() {
        bail!(
            "--policy-churn needs --twin NS: it changes the policies `NS:<device>` of the \
             things the devices update (as `bench provision` makes them)"
        );
    }
    if input.devices == 0 {
        bail!("--policy-churn needs devices: it changes the devices' policies");
    }
    let Some(solution) = input.solution else {
        bail!(
            "--policy-churn needs --solution ID: the HTTP API is called as that solution, with \
             the secret in THINGSGATE_SECRET"
        );
    };
    let solution = SolutionId::parse(solution).context("--solution")?;
    let base = BaseUrl::parse(&http, "thingsgate bench run")?;
    if !input.allow_remote && !base.is_loopback() {
        bail!(
            "--http `{}` is not this machine; the secret would travel in plain HTTP: pass \
             --allow-remote if you mean it",
            base.host()
        );
    }
    let api = Api::new(base, &solution, secret_from_env)?;
    Ok(Some(ChurnSettings {
        every: Duration::from_secs_f64(every),
        api: Arc::new(api),
    }))
}

/// The entry written by change number `round` of a policy: the grant alternates, so every
/// write is a new revision, and the subject is nobody's.
pub(super) fn entry(round: u64) -> Value {
    let grant = if round.is_multiple_of(2) {
        json!(["READ"])
    } else {
        json!(["READ", "WRITE"])
    };
    json!({
        "subjects": {SUBJECT: {"type": "bench policy churn (no client holds this subject)"}},
        "resources": {"thing:/attributes/bench-churn": {"grant": grant, "revoke": []}}
    })
}

/// What the churn did.
#[derive(Debug, Clone, Default)]
pub(super) struct Summary {
    /// The period, in seconds.
    pub(super) every: f64,
    /// The policies changed round-robin (one per device).
    pub(super) policies: usize,
    /// Policies the server changed.
    pub(super) changed: u64,
    /// Changes that failed (refused, or no answer).
    pub(super) failed: u64,
    /// The first failure's reason.
    pub(super) first_error: Option<String>,
    /// Each attempt's HTTP round trip, in milliseconds.
    round_trips_ms: Vec<f64>,
}

impl Summary {
    fn count(&mut self, result: anyhow::Result<()>, round_trip: Duration) {
        self.round_trips_ms.push(round_trip.as_secs_f64() * 1e3);
        match result {
            Ok(()) => self.changed += 1,
            Err(e) => {
                self.failed += 1;
                self.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }

    /// The round trips' median and maximum, in milliseconds.
    pub(super) fn round_trip_ms(&self) -> Option<(f64, f64)> {
        let mut sorted = self.round_trips_ms.clone();
        sorted.sort_by(f64::total_cmp);
        let p50 = *sorted.get(sorted.len().saturating_sub(1) / 2)?;
        let max = *sorted.last()?;
        Some((p50, max))
    }

    pub(super) fn to_json(&self) -> Value {
        let round = |x: f64| (x * 1000.0).round() / 1000.0;
        json!({
            "every_s": self.every,
            "policies": self.policies,
            "changes": self.changed,
            "failed": self.failed,
            "http_ms": self.round_trip_ms().map(|(p50, max)| json!({
                "p50": round(p50),
                "max": round(max),
            })),
            "first_error": self.first_error,
        })
    }

    pub(super) fn to_text(&self) -> String {
        let mut line = format!(
            "{} changes (one every {} s, round-robin over {} policies), {} failed",
            self.changed, self.every, self.policies, self.failed
        );
        if let Some((p50, max)) = self.round_trip_ms() {
            line.push_str(&format!("; HTTP p50 {p50:.1} ms, max {max:.1} ms"));
        }
        if let Some(e) = &self.first_error {
            line.push_str(&format!(" (first failure: {e})"));
        }
        line
    }
}

/// The policies to change and how.
#[derive(Debug)]
pub(super) struct Churn {
    every: Duration,
    api: Arc<Api>,
    /// Per device, the URL of its policy's entry.
    urls: Vec<String>,
}

impl Churn {
    /// The churn of the devices named `names` in namespace `namespace`.
    pub(super) fn new(settings: &ChurnSettings, namespace: &str, names: &[String]) -> Self {
        let urls = names
            .iter()
            .map(|name| {
                format!(
                    "{}/api/2/policies/{}:{}/entries/{ENTRY}",
                    settings.api.base(),
                    segment(namespace),
                    segment(name)
                )
            })
            .collect();
        Churn {
            every: settings.every,
            api: settings.api.clone(),
            urls,
        }
    }

    /// Changes one policy every period until `over` says publishing is over.
    pub(super) async fn run(self, mut over: watch::Receiver<bool>) -> Summary {
        let mut summary = Summary {
            every: self.every.as_secs_f64(),
            policies: self.urls.len(),
            ..Summary::default()
        };
        let client = http_client::client(1);
        let mut ticks = tokio::time::interval_at(Instant::now() + self.every, self.every);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let devices = self.urls.len().max(1) as u64;
        let mut n = 0u64;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                changed = over.changed() => if changed.is_err() || *over.borrow() {
                    break;
                },
            }
            if *over.borrow() {
                break;
            }
            let Some(url) = usize::try_from(n % devices)
                .ok()
                .and_then(|i| self.urls.get(i))
            else {
                break;
            };
            let began = Instant::now();
            let result = self.change(&client, url, n / devices).await;
            summary.count(result, began.elapsed());
            n += 1;
        }
        summary
    }

    /// One PUT of the entry, under [`REQUEST_TIMEOUT`].
    async fn change(&self, client: &HttpClient, url: &str, round: u64) -> anyhow::Result<()> {
        let body = serde_json::to_vec(&entry(round))?;
        let sent = tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.api.send(client, hyper::Method::PUT, url, Some(body)),
        )
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {REQUEST_TIMEOUT:?} (PUT {url})"))?;
        let (status, bytes) = sent?;
        if status.is_success() {
            Ok(())
        } else {
            Err(anyhow::Error::new(self.api.refusal(status, &bytes)))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;

    fn input(every: Option<f64>) -> ChurnInput<'static> {
        ChurnInput {
            every,
            http: Some("http://127.0.0.1:8080".to_owned()),
            solution: Some("acme"),
            twin: Some("org.acme"),
            devices: 3,
            allow_remote: false,
        }
    }

    #[test]
    fn the_entry_alternates_its_grant_and_names_nobody_the_run_has() {
        let (even, odd) = (entry(0), entry(1));
        assert_ne!(even, odd);
        assert_eq!(entry(2), even);
        let subjects = even["subjects"].as_object().unwrap();
        assert_eq!(subjects.keys().collect::<Vec<_>>(), [SUBJECT]);
        policy::model::SubjectId::parse(SUBJECT).unwrap();
    }

    #[test]
    fn churn_without_its_api_twin_mode_or_solution_is_refused() {
        let refused = |input: ChurnInput<'_>, needle: &str| {
            let e = settings(input).unwrap_err().to_string();
            assert!(e.contains(needle), "`{needle}` not in: {e}");
        };
        refused(
            ChurnInput {
                http: None,
                ..input(Some(1.0))
            },
            "--http",
        );
        refused(
            ChurnInput {
                twin: None,
                ..input(Some(1.0))
            },
            "--twin",
        );
        refused(
            ChurnInput {
                solution: None,
                ..input(Some(1.0))
            },
            "--solution",
        );
        refused(
            ChurnInput {
                devices: 0,
                ..input(Some(1.0))
            },
            "devices",
        );
        refused(input(Some(0.0)), "--policy-churn");
        refused(input(None), "--policy-churn");
        refused(
            ChurnInput {
                http: Some("http://10.1.2.3:8080".to_owned()),
                ..input(Some(1.0))
            },
            "--allow-remote",
        );
        let mut no_http = input(None);
        no_http.http = None;
        assert!(settings(no_http).unwrap().is_none());
    }

    #[test]
    fn policies_are_changed_round_robin_with_percent_encoded_ids() {
        let api = Api::new(
            BaseUrl::parse("127.0.0.1:1", "x").unwrap(),
            &SolutionId::parse("acme").unwrap(),
            |_| Ok("s".to_owned()),
        )
        .unwrap();
        let settings = ChurnSettings {
            every: Duration::from_secs(1),
            api: Arc::new(api),
        };
        let churn = Churn::new(
            &settings,
            "org.acme",
            &["dev-0".to_owned(), "dev 1".to_owned()],
        );
        assert_eq!(
            churn.urls,
            [
                "http://127.0.0.1:1/api/2/policies/org.acme:dev-0/entries/bench-churn",
                "http://127.0.0.1:1/api/2/policies/org.acme:dev%201/entries/bench-churn",
            ]
        );
    }

    #[test]
    fn the_summary_counts_failures_and_gives_the_median_and_max_round_trip() {
        let mut s = Summary {
            every: 0.5,
            ..Summary::default()
        };
        assert_eq!(s.round_trip_ms(), None);
        for ms in [4, 1, 3] {
            s.count(Ok(()), Duration::from_millis(ms));
        }
        s.count(
            Err(anyhow::anyhow!("the server refused (403)")),
            Duration::from_millis(9),
        );
        s.count(Err(anyhow::anyhow!("second")), Duration::from_millis(2));
        assert_eq!((s.changed, s.failed), (3, 2));
        assert_eq!(s.round_trip_ms(), Some((3.0, 9.0)));
        assert_eq!(s.first_error.as_deref(), Some("the server refused (403)"));
        let json = s.to_json();
        assert_eq!(json["changes"], 3);
        assert_eq!(json["http_ms"]["max"], 9.0);
        assert!(s.to_text().starts_with("3 changes"), "{}", s.to_text());
    }
}
