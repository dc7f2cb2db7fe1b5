//! `make chaos`: runs the chaos cases of `integration_tests::harness::chaos` one after the other
//! (or the ones named on the command line), each on its own fresh stack, and exits non-zero if any
//! case found an invariant violation or failed. `scripts/chaos.sh` starts a private RabbitMQ node
//! for it first; `--list` prints the case names.

use std::future::Future;
use std::pin::Pin;

use clap::Parser;
use futures::FutureExt;
use integration_tests::harness::chaos;

type Case = fn() -> Pin<Box<dyn Future<Output = ()>>>;

const CASES: [(&str, Case); 6] = [
    ("scheduler_kill_and_pause", || {
        Box::pin(chaos::chaos_scheduler_kill_and_pause())
    }),
    ("supervisor_kill_mid_compensation", || {
        Box::pin(chaos::chaos_supervisor_kill_mid_compensation())
    }),
    ("domain_service_restart", || {
        Box::pin(chaos::chaos_domain_service_restart())
    }),
    ("rabbitmq_restart", || {
        Box::pin(chaos::chaos_rabbitmq_restart())
    }),
    ("downstream_faults", || {
        Box::pin(chaos::chaos_downstream_faults())
    }),
    ("package_outage_behind_the_breaker", || {
        Box::pin(chaos::chaos_package_outage_behind_the_breaker())
    }),
];

/// Runs the chaos cases (`make chaos`), each on its own fresh stack; the exit status is non-zero
/// if any found an invariant violation or failed.
#[derive(Parser)]
#[command(name = "chaos", args_override_self = true)]
struct Args {
    /// Print the case names and exit
    #[arg(long)]
    list: bool,
    /// The cases to run [default: every case]
    #[arg(value_name = "CASE")]
    cases: Vec<String>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if args.list {
        for (name, _) in CASES {
            println!("{name}");
        }
        return std::process::ExitCode::SUCCESS;
    }
    if let Some(unknown) = args
        .cases
        .iter()
        .find(|a| !CASES.iter().any(|(name, _)| name == a))
    {
        eprintln!("no chaos case named {unknown:?}; --list shows them");
        return std::process::ExitCode::from(2);
    }
    let mut failed = Vec::new();
    for (name, case) in CASES {
        if !args.cases.is_empty() && !args.cases.iter().any(|a| a == name) {
            continue;
        }
        println!("START {name}");
        let started = std::time::Instant::now();
        let outcome = std::panic::AssertUnwindSafe(case()).catch_unwind().await;
        let secs = started.elapsed().as_secs_f64();
        match outcome {
            Ok(()) => println!("PASS {name} ({secs:.1} s)"),
            Err(_) => {
                println!("FAIL {name} ({secs:.1} s)");
                failed.push(name);
            }
        }
    }
    if failed.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        println!("failed chaos cases: {}", failed.join(", "));
        std::process::ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_arguments_of_chaos_sh_parse() -> Result<(), clap::Error> {
        Args::command().debug_assert();
        let args = Args::try_parse_from(["chaos", "rabbitmq_restart", "downstream_faults"])?;
        assert_eq!(args.cases, ["rabbitmq_restart", "downstream_faults"]);
        assert!(Args::try_parse_from(["chaos", "--list"])?.list);
        Ok(())
    }
}
