use clap::Parser;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = extblk::cli::Cli::parse();
    if let Err(e) = extblk::cli::run(cli) {
        eprintln!("extblk: {e}");
        std::process::exit(1);
    }
}
