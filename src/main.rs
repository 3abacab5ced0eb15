use clap::Parser;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    // Before any thread exists: a panic on any of them stops the daemon (see extblk::fatal).
    extblk::fatal::install_panic_hook();
    let cli = extblk::cli::Cli::parse();
    match extblk::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("extblk: {}", extblk::cli::error_chain(&e));
            std::process::exit(1);
        }
    }
}
