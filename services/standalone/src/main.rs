#[global_allocator]
static GLOBAL: service_kit::MiMalloc = service_kit::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = telemetry::init(
        "standalone",
        "info,sqlx=warn,sea_orm_migration=warn,actix_server=warn",
        telemetry::LogFormat::Pretty,
    );
    let settings: standalone::Settings = service_kit::settings::load("standalone")?;
    standalone::run(settings, service_kit::shutdown_signal()).await
}
