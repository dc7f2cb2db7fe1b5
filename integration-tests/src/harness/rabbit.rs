//! Stopping and starting the RabbitMQ node the stack talks to, with `rabbitmqctl`.
//!
//! The node is `RABBITMQ_NODE` (e.g. `chaos@localhost`, the private node `make chaos` starts so
//! that a restart never disturbs anything else on the machine), else rabbitmqctl's default node.
//! Every stop first waits for `rabbitmqctl await_startup`: stopping a node that has not finished
//! booting can leave stream queues down. `stop_app`/`start_app` stop the broker but keep the
//! Erlang node, the gentle way to restart it.

use std::process::Command;
use std::time::{Duration, Instant};

/// The RabbitMQ node under test.
#[derive(Debug, Clone)]
pub struct RabbitNode {
    node: Option<String>,
}

impl RabbitNode {
    pub fn from_env() -> Self {
        RabbitNode {
            node: std::env::var("RABBITMQ_NODE")
                .ok()
                .filter(|n| !n.is_empty()),
        }
    }

    /// The node name, when one is set.
    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    async fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let mut all: Vec<String> = Vec::new();
        if let Some(n) = &self.node {
            all.push("-n".into());
            all.push(n.clone());
        }
        all.extend(args.iter().map(|a| (*a).to_owned()));
        let shown = all.join(" ");
        tokio::task::spawn_blocking(move || {
            let out = Command::new("rabbitmqctl")
                .args(&all)
                .output()
                .map_err(|e| format!("rabbitmqctl {shown}: {e}"))?;
            if out.status.success() {
                Ok(String::from_utf8_lossy(&out.stdout).into_owned())
            } else {
                Err(format!(
                    "rabbitmqctl {shown}: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Waits until the node has fully booted (`rabbitmqctl await_startup`).
    pub async fn await_startup(&self, within: Duration) -> Result<(), String> {
        let secs = within.as_secs().max(1).to_string();
        self.ctl(&["-q", "await_startup", "--timeout", &secs])
            .await
            .map(|_| ())
    }

    /// Stops the broker application (the Erlang node stays up), after it has fully booted.
    pub async fn stop_app(&self) -> Result<(), String> {
        self.await_startup(Duration::from_secs(120)).await?;
        self.ctl(&["-q", "stop_app"]).await.map(|_| ())
    }

    /// Starts the broker application again and waits until it has fully booted.
    pub async fn start_app(&self) -> Result<(), String> {
        self.ctl(&["-q", "start_app"]).await?;
        self.await_startup(Duration::from_secs(120)).await
    }

    /// Stops the broker for `down`, starts it again; returns how long it was unavailable in all
    /// (stop + `down` + start until booted).
    pub async fn restart(&self, down: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        println!(
            "rabbitmq: stopping at {}",
            chrono::Utc::now().format("%H:%M:%S%.3f")
        );
        let stopped = self.stop_app().await;
        if stopped.is_ok() {
            tokio::time::sleep(down).await;
        }
        // Started again whatever the stop said: a half-stopped node must not stay down.
        let restarted = self.start_app().await;
        println!(
            "rabbitmq: up again at {}",
            chrono::Utc::now().format("%H:%M:%S%.3f")
        );
        stopped?;
        restarted?;
        Ok(started.elapsed())
    }
}
