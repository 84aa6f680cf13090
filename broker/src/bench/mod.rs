//! `thingsgate bench`: simulated devices at scale (DESIGN.md §10, the load-generator issue) —
//! a load generator users can run against any MQTT broker (and Thingsgate's twins), so that
//! figures come from a tool and not only from `cargo bench` harnesses.
//!
//! - `provision`: what a run needs in a Thingsgate solution (things with policies for the
//!   simulated devices, subscriber subjects), made through the HTTP API first, so that a run
//!   measures steady state, not setup.
//! - `run`: N devices (each its own connection) publishing at a rate or as fast as a closed
//!   loop allows, M subscribers, bounded in time and count; a live progress line and a
//!   report (sent, received, lost, throughput, end-to-end latency percentiles from an HDR
//!   histogram, connect rate, errors by kind) as text or JSON.
//! - `compare`: Thingsgate side by side with Mosquitto, rumqttd and RabbitMQ in one run, each
//!   broker started fresh and driven by `run`; a table of medians and ratios.

pub mod compare;
mod procfs;
pub mod provision;
pub mod run;

/// Subcommands of `thingsgate bench`.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Create the things, policies and subscriber subjects a run needs, through the HTTP API
    /// of a running Thingsgate.
    Provision(provision::ProvisionArgs),
    /// Simulate devices and subscribers against an MQTT broker; prints a report.
    Run(Box<run::RunArgs>),
    /// Thingsgate side by side with Mosquitto (rumqttd, RabbitMQ) in one run: each broker
    /// started fresh, driven by `bench run`, its CPU and memory from /proc; a table of ratios.
    Compare(Box<compare::CompareArgs>),
}

/// Runs a `bench` subcommand.
pub fn main(command: BenchCommand) -> anyhow::Result<std::process::ExitCode> {
    match command {
        BenchCommand::Provision(args) => provision::main(args),
        BenchCommand::Run(args) => run::main(*args),
        BenchCommand::Compare(args) => compare::main(*args),
    }
}

/// `x` rounded, with thousands separated by commas (`1,234,567`); negatives as 0.
fn thousands(x: f64) -> String {
    let digits = (x.round().max(0.0) as u64).to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(d);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn big_numbers_are_grouped() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
        assert_eq!(thousands(-5.0), "0");
    }
}
