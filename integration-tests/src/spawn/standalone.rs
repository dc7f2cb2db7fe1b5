//! `make run` inside a test: [`standalone::run_with`] on a data directory, every service on a free
//! port, stopped cleanly by [`Standalone::stop`].

use std::collections::BTreeMap;
use std::path::Path;

use tokio::sync::oneshot;

/// The suite of `make run`, running.
pub struct Standalone {
    pub ports: standalone::Endpoints,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Standalone {
    /// `make run`'s settings on `dir`, each service on a free port.
    pub fn settings(dir: &Path) -> standalone::Settings {
        standalone::Settings {
            data_dir: dir.to_path_buf(),
            ports: standalone::Ports {
                ingestion: 0,
                scheduler: 0,
                account: 0,
                package: 0,
                drone: 0,
                delivery: 0,
                supervisor: 0,
                thirdparty: 0,
            },
            ..Default::default()
        }
    }

    /// Starts the suite and waits until every service listens.
    pub async fn start(settings: standalone::Settings) -> Standalone {
        let (stop, stop_rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = tokio::spawn(standalone::run_with(
            settings,
            async {
                let _ = stop_rx.await;
            },
            move |e| {
                let _ = ready_tx.send(e.clone());
            },
        ));
        let ports = ready_rx.await.expect("suite started");
        Standalone { ports, stop, task }
    }

    /// Stops every service and asserts it stopped cleanly.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.expect("joined").expect("clean shutdown");
    }

    /// What the suite wrote to `dir/credentials.env`.
    pub fn credentials(dir: &Path) -> BTreeMap<String, String> {
        std::fs::read_to_string(dir.join("credentials.env"))
            .expect("credentials.env written")
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.trim_matches('\'').to_owned()))
            .collect()
    }
}
