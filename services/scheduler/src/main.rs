use scheduler::{Application, Settings};

#[global_allocator]
static GLOBAL: service_kit::MiMalloc = service_kit::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = telemetry::init("scheduler", "info", telemetry::LogFormat::Json);
    let settings: Settings = service_kit::settings::load("scheduler")?;
    let app = Application::build(settings).await?;
    app.run_until(service_kit::shutdown_signal()).await?;
    Ok(())
}
