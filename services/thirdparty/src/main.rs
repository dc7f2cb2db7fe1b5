#[global_allocator]
static GLOBAL: service_kit::MiMalloc = service_kit::MiMalloc;

fn main() -> anyhow::Result<()> {
    service_kit::main::<thirdparty::Application>()
}
