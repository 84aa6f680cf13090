//! The run's timeline: per interval, messages sent and received per second and the latency
//! percentiles of the deliveries received in that interval — the series of `--plot` and of
//! the JSON report's `timeline`.
//!
//! # Cost
//! The generator shares its cores with the broker it measures, so the timeline adds no lock
//! and no allocation per message. Subscribers already take one lock per read batch to record
//! their latencies; [`Latencies`] keeps the interval's histogram beside the run's under that
//! same lock, and a latency is recorded into both. Once per step a sampler task swaps the
//! interval histogram for an empty one (a few words moved under the lock) and reads its
//! percentiles outside it; the counts come from the counters the progress line reads.
//!
//! # The step
//! [`step`]: the finest of 0.25, 0.5, 1, 2, 5, 10, 30 and 60 s that gives at most
//! [`MAX_POINTS`] points over the publishing time. A quarter second shows the transients of a
//! default 10 s run (40 points: a stall, a slow start, a garbage-collection-like pause in the
//! broker) while an interval still holds hundreds of deliveries at the rates a load test runs,
//! so its p99 is a figure and not one sample; finer would mostly plot noise and cost wake-ups.
//! At most [`MAX_POINTS`] points fit a plot a thousand pixels wide (5 px apart) and keep the
//! JSON small, so an hour's run is sampled every 30 s.
//!
//! # Phases
//! `t` is the end of an interval in seconds since the ramp began. The run ends the ramp's last
//! interval itself just before it lets the devices go, and the steps restart from there, so
//! no interval mixes the ramp with publishing. An interval shorter than
//! a quarter step (the rest of the ramp, the end of a short drain) is folded into the one
//! before it — counts added, histograms merged — rather than plotted as a spike of a rate over
//! a few milliseconds.

use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use super::settings::{Rate, Settings};

/// The most points a timeline is planned to have (see [`step`]).
pub(super) const MAX_POINTS: f64 = 200.0;
/// The steps [`step`] chooses from, in seconds.
const STEPS: [f64; 8] = [0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0];
/// A closed-loop run ended by `--count` alone has no length to plan for: this is assumed.
const UNKNOWN_LENGTH: Duration = Duration::from_secs(60);
/// Significant digits of the interval histograms: percentiles within 1 %, which a plot cannot
/// tell apart, in an eighth of the memory a run's histogram takes (it is swapped and cleared
/// every step).
const INTERVAL_DIGITS: u8 = 2;

/// The run's latencies and the current interval's, under one lock.
#[derive(Debug)]
pub(super) struct Latencies {
    /// The whole run's: the report's percentiles.
    pub(super) total: Histogram<u64>,
    /// Since the sampler last took it.
    interval: Histogram<u64>,
}

impl Latencies {
    /// `total` for the run, and an interval histogram of the same range.
    pub(super) fn new(total: Histogram<u64>) -> anyhow::Result<Self> {
        Ok(Latencies {
            interval: interval_histogram(total.high())?,
            total,
        })
    }

    /// One latency, in nanoseconds.
    pub(super) fn record(&mut self, ns: u64) {
        self.total.saturating_record(ns);
        self.interval.saturating_record(ns);
    }

    /// The interval so far, exchanged for `empty` (an empty histogram of the same range).
    fn take_interval(&mut self, empty: &mut Histogram<u64>) {
        std::mem::swap(&mut self.interval, empty);
    }
}

fn interval_histogram(high: u64) -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, high.max(2), INTERVAL_DIGITS)
        .map_err(|e| anyhow::anyhow!("interval latency histogram: {e}"))
}

/// The sampling step of a run (see the module's documentation).
pub(super) fn step(s: &Settings) -> Duration {
    let planned = match (s.count, s.rate) {
        // Paced: the count ends the run when every device has sent its share.
        (Some(count), Rate::PerSecond(rate)) => {
            let seconds = count as f64 / (rate * s.devices.max(1) as f64);
            s.duration
                .min(Duration::from_secs_f64(seconds.clamp(0.0, 3600.0)))
        }
        (Some(_), _) => s.duration.min(UNKNOWN_LENGTH),
        (None, _) => s.duration,
    };
    step_for(planned)
}

/// The finest step giving at most [`MAX_POINTS`] points over `planned`.
fn step_for(planned: Duration) -> Duration {
    let seconds = planned.as_secs_f64();
    let chosen = STEPS
        .iter()
        .copied()
        .find(|step| seconds / step <= MAX_POINTS)
        .unwrap_or(60.0);
    Duration::from_secs_f64(chosen)
}

/// Latency percentiles of one interval, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Percentiles {
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
    pub(super) max_ms: f64,
    /// Deliveries they are taken from.
    pub(super) samples: u64,
}

impl Percentiles {
    fn of(histogram: &Histogram<u64>) -> Option<Self> {
        let ms = |ns: u64| ns as f64 / 1e6;
        (!histogram.is_empty()).then(|| Percentiles {
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            max_ms: ms(histogram.max()),
            samples: histogram.len(),
        })
    }
}

/// One interval.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Point {
    /// Its end, in seconds since the ramp began.
    pub(super) t: f64,
    /// Its length in seconds (a step, or less at a phase's end).
    pub(super) seconds: f64,
    /// Messages written to the sockets in it.
    pub(super) sent: u64,
    /// Unique deliveries received in it.
    pub(super) received: u64,
    /// Of the deliveries received in it; `None` when there were none.
    pub(super) latency: Option<Percentiles>,
}

impl Point {
    pub(super) fn sent_per_second(&self) -> f64 {
        per_second(self.sent, self.seconds)
    }

    pub(super) fn received_per_second(&self) -> f64 {
        per_second(self.received, self.seconds)
    }

    /// Its middle, in seconds since the ramp began.
    pub(super) fn middle(&self) -> f64 {
        self.t - self.seconds / 2.0
    }
}

fn per_second(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

/// Where a point lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Ramp,
    Publish,
    Drain,
}

impl Phase {
    pub(super) fn name(self) -> &'static str {
        match self {
            Phase::Ramp => "ramp",
            Phase::Publish => "publish",
            Phase::Drain => "drain",
        }
    }
}

/// A run's series, with its phases' bounds.
#[derive(Debug, Clone, Default)]
pub(super) struct Timeline {
    /// The planned step, in seconds.
    pub(super) step: f64,
    pub(super) points: Vec<Point>,
    /// When publishing started, in seconds since the ramp began (the ramp's end).
    pub(super) publish_start: f64,
    /// When the last device stopped publishing (the drain's start).
    pub(super) publish_end: f64,
    /// When the run ended (the drain's end).
    pub(super) end: f64,
}

impl Timeline {
    /// The phase a point belongs to, by its middle.
    pub(super) fn phase_of(&self, point: &Point) -> Phase {
        let middle = point.middle();
        if middle < self.publish_start {
            Phase::Ramp
        } else if middle < self.publish_end {
            Phase::Publish
        } else {
            Phase::Drain
        }
    }

    /// The JSON report's `timeline`: one object per interval.
    pub(super) fn points_json(&self) -> Value {
        let round = |x: f64| (x * 1000.0).round() / 1000.0;
        let points: Vec<Value> = self
            .points
            .iter()
            .map(|p| {
                let latency = |f: fn(&Percentiles) -> f64| p.latency.as_ref().map(|l| round(f(l)));
                json!({
                    "t": round(p.t),
                    "interval_s": round(p.seconds),
                    "phase": self.phase_of(p).name(),
                    "sent": p.sent,
                    "received": p.received,
                    "sent_per_s": round(p.sent_per_second()),
                    "received_per_s": round(p.received_per_second()),
                    "p50_ms": latency(|l| l.p50_ms),
                    "p99_ms": latency(|l| l.p99_ms),
                    "max_ms": latency(|l| l.max_ms),
                })
            })
            .collect();
        Value::Array(points)
    }

    /// The JSON report's `phases`: each phase's start and end in the timeline's seconds.
    pub(super) fn phases_json(&self) -> Value {
        let round = |x: f64| (x * 1000.0).round() / 1000.0;
        json!({
            "step_s": self.step,
            "ramp_s": [0.0, round(self.publish_start)],
            "publish_s": [round(self.publish_start), round(self.publish_end)],
            "drain_s": [round(self.publish_end), round(self.end)],
        })
    }
}

/// Closes intervals into points. [`Sampler::sample`] is pure (times are offsets from the
/// ramp's start), so that the bookkeeping is tested without a clock.
#[derive(Debug)]
pub(super) struct Sampler {
    /// `t = 0`: the ramp's start.
    origin: Instant,
    step: Duration,
    points: Vec<Point>,
    /// The end of the last point.
    last_at: Duration,
    /// The counters' totals at the end of the last point.
    last_sent: u64,
    last_received: u64,
    /// The last point's latencies, kept until the next point so that a short interval can be
    /// folded into it.
    last: Histogram<u64>,
    /// Empty; exchanged for the interval's histogram at each sample.
    spare: Histogram<u64>,
}

impl Sampler {
    /// A sampler of `step` from `origin` for latencies of at most `high` ns.
    pub(super) fn new(step: Duration, high: u64, origin: Instant) -> anyhow::Result<Self> {
        Ok(Sampler {
            origin,
            step,
            points: Vec::new(),
            last_at: Duration::ZERO,
            last_sent: 0,
            last_received: 0,
            last: interval_histogram(high)?,
            spare: interval_histogram(high)?,
        })
    }

    /// Ends the interval now: see [`Sampler::sample`].
    pub(super) fn sample_now(&mut self, sent: u64, received: u64, latencies: &Mutex<Latencies>) {
        self.sample(self.origin.elapsed(), sent, received, latencies);
    }

    /// Ends the interval at `at` (since the ramp began): `sent` and `received` are the totals
    /// so far; the interval's latencies are taken from `latencies`.
    pub(super) fn sample(
        &mut self,
        at: Duration,
        sent: u64,
        received: u64,
        latencies: &Mutex<Latencies>,
    ) {
        latencies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take_interval(&mut self.spare);
        // `spare` now holds the interval; the lock is released before any work on it.
        let seconds = at.saturating_sub(self.last_at);
        let sent_now = sent.saturating_sub(self.last_sent);
        let received_now = received.saturating_sub(self.last_received);
        self.last_at = at;
        self.last_sent = sent;
        self.last_received = received;
        let short = seconds < self.step / 4;
        if short
            && let Some(previous) = self.points.last_mut()
            && self.last.add(&self.spare).is_ok()
        {
            previous.t = at.as_secs_f64();
            previous.seconds += seconds.as_secs_f64();
            previous.sent += sent_now;
            previous.received += received_now;
            previous.latency = Percentiles::of(&self.last);
            self.spare.reset();
            return;
        }
        if seconds.is_zero() {
            // Nothing to show (a mark right after a tick); its latencies, if any, are in the
            // run's histogram.
            self.spare.reset();
            return;
        }
        std::mem::swap(&mut self.last, &mut self.spare);
        self.spare.reset();
        self.points.push(Point {
            t: at.as_secs_f64(),
            seconds: seconds.as_secs_f64(),
            sent: sent_now,
            received: received_now,
            latency: Percentiles::of(&self.last),
        });
    }

    /// The timeline (its points are taken out), with the phases' bounds.
    pub(super) fn finish(
        &mut self,
        publish_start: Instant,
        publish_end: Instant,
        end: Instant,
    ) -> Timeline {
        let since = |at: Instant| at.saturating_duration_since(self.origin).as_secs_f64();
        let publish_start = since(publish_start);
        let publish_end = since(publish_end).max(publish_start);
        Timeline {
            step: self.step.as_secs_f64(),
            points: std::mem::take(&mut self.points),
            publish_start,
            publish_end,
            end: since(end).max(publish_end),
        }
    }
}

/// Calls `sample` every `step` from `from` on, until the task is aborted (the run ends the
/// intervals at phase changes itself, then restarts the steps).
pub(super) fn every_step(
    step: Duration,
    from: Instant,
    sample: impl Fn() + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval_at(from + step, step);
        // A late tick (a busy runtime) does not shift the next ones: the steps stay on the
        // grid from `from`, so the last one of a run ends at its deadline (each point's rate
        // is over its real length anyway).
        ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
        loop {
            ticks.tick().await;
            sample();
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;

    const HIGH: u64 = 3_600_000_000_000;

    fn latencies() -> Mutex<Latencies> {
        Mutex::new(Latencies::new(Histogram::new_with_bounds(1, HIGH, 3).unwrap()).unwrap())
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A sampler of `step_ms` and its clock: `at(n)` is `n` ms after its origin.
    fn sampler(step_ms: u64) -> (Sampler, impl Fn(u64) -> Instant) {
        let origin = Instant::now();
        let s = Sampler::new(ms(step_ms), HIGH, origin).unwrap();
        (s, move |n| origin + ms(n))
    }

    fn record_ms(latencies: &Mutex<Latencies>, values: &[u64]) {
        let mut l = latencies.lock().unwrap();
        for v in values {
            l.record(v * 1_000_000);
        }
    }

    #[test]
    fn the_step_gives_at_most_two_hundred_points_and_never_less_than_a_quarter_second() {
        assert_eq!(step_for(Duration::from_secs(2)), ms(250));
        assert_eq!(step_for(Duration::from_secs(10)), ms(250));
        assert_eq!(step_for(Duration::from_secs(50)), ms(250));
        assert_eq!(step_for(Duration::from_secs(60)), ms(500));
        assert_eq!(step_for(Duration::from_secs(600)), Duration::from_secs(5));
        assert_eq!(step_for(Duration::from_secs(3600)), Duration::from_secs(30));
    }

    #[test]
    fn each_interval_has_its_own_counts_and_percentiles_and_the_run_keeps_them_all() {
        let l = latencies();
        let (mut s, at) = sampler(250);
        record_ms(&l, &[1, 1, 1, 100]);
        s.sample(ms(250), 40, 4, &l);
        record_ms(&l, &[5, 5]);
        s.sample(ms(500), 60, 6, &l);
        // Nothing received in the third.
        s.sample(ms(750), 70, 6, &l);
        let t = s.finish(at(0), at(750), at(750));
        assert_eq!(t.points.len(), 3);
        let [a, b, c] = [&t.points[0], &t.points[1], &t.points[2]];
        assert_eq!((a.sent, a.received), (40, 4));
        assert!((a.sent_per_second() - 160.0).abs() < 1e-9);
        assert!((b.received_per_second() - 8.0).abs() < 1e-9);
        let la = a.latency.unwrap();
        assert!((la.p50_ms - 1.0).abs() < 0.02, "{la:?}");
        assert!((la.max_ms - 100.0).abs() < 1.0, "{la:?}");
        assert_eq!(la.samples, 4);
        let lb = b.latency.unwrap();
        assert!(
            (lb.p99_ms - 5.0).abs() < 0.1,
            "the first interval's 100 ms is gone: {lb:?}"
        );
        assert_eq!(c.latency, None);
        assert_eq!(c.sent, 10);
        assert_eq!(
            l.lock().unwrap().total.len(),
            6,
            "the run's histogram keeps everything"
        );
    }

    #[test]
    fn a_short_interval_is_folded_into_the_one_before_with_its_latencies() {
        let l = latencies();
        let (mut s, at) = sampler(1000);
        record_ms(&l, &[2; 9]);
        s.sample(ms(1000), 100, 9, &l);
        // 10 ms later, the run ends: 1 more delivery, much slower.
        record_ms(&l, &[50]);
        s.sample(ms(1010), 100, 10, &l);
        let t = s.finish(at(0), at(1000), at(1010));
        assert_eq!(t.points.len(), 1, "{:?}", t.points);
        let p = &t.points[0];
        assert!(
            (p.t - 1.01).abs() < 1e-9 && (p.seconds - 1.01).abs() < 1e-9,
            "{p:?}"
        );
        assert_eq!((p.sent, p.received), (100, 10));
        let latency = p.latency.unwrap();
        assert_eq!(latency.samples, 10);
        assert!((latency.max_ms - 50.0).abs() < 0.5, "{latency:?}");
    }

    #[test]
    fn a_short_first_interval_stays_and_an_empty_one_is_dropped() {
        let l = latencies();
        let (mut s, at) = sampler(1000);
        // A 50 ms ramp: nothing before it to fold into.
        s.sample(ms(50), 0, 0, &l);
        s.sample(ms(50), 0, 0, &l);
        s.sample(ms(1050), 500, 500, &l);
        let t = s.finish(at(50), at(1050), at(1050));
        assert_eq!(t.points.len(), 2, "{:?}", t.points);
        assert_eq!(t.phase_of(&t.points[0]), Phase::Ramp);
        assert_eq!(t.phase_of(&t.points[1]), Phase::Publish);
    }

    #[test]
    fn points_are_placed_in_phases_by_their_middle_and_the_json_says_so() {
        let l = latencies();
        let (mut s, at) = sampler(250);
        for (i, at) in [100u64, 350, 600, 850, 1100].into_iter().enumerate() {
            record_ms(&l, &[3]);
            s.sample(ms(at), i as u64 * 10, i as u64 + 1, &l);
        }
        let t = s.finish(at(100), at(850), at(1100));
        let phases: Vec<Phase> = t.points.iter().map(|p| t.phase_of(p)).collect();
        assert_eq!(
            phases,
            [
                Phase::Ramp,
                Phase::Publish,
                Phase::Publish,
                Phase::Publish,
                Phase::Drain
            ]
        );
        let json = t.points_json();
        assert_eq!(json[1]["phase"], "publish");
        assert_eq!(json[1]["t"], 0.35);
        assert_eq!(json[1]["sent_per_s"], 40.0);
        assert!(
            json[1]["p50_ms"]
                .as_f64()
                .is_some_and(|v| (v - 3.0).abs() < 0.05)
        );
        assert_eq!(t.phases_json()["publish_s"], json!([0.1, 0.85]));
    }

    #[tokio::test(start_paused = true)]
    async fn the_ticker_samples_once_a_step_from_its_start_until_aborted() {
        let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let ticker = {
            let count = count.clone();
            every_step(ms(250), Instant::now() + ms(100), move || {
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            })
        };
        let seen = || count.load(std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(ms(340)).await;
        assert_eq!(seen(), 0, "the first step ends at 350 ms");
        tokio::time::sleep(ms(20)).await;
        assert_eq!(seen(), 1);
        tokio::time::sleep(ms(500)).await;
        assert_eq!(seen(), 3, "850 ms: steps ended at 350, 600 and 850");
        ticker.abort();
        tokio::time::sleep(ms(1000)).await;
        assert_eq!(seen(), 3, "nothing after the abort");
    }
}
