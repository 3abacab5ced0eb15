//! Writes extblk's man pages (roff) from its clap definition: `extblk.1` and one
//! `extblk-SUBCOMMAND.1` per subcommand, into the directory given (scripts/man.sh).

use std::path::PathBuf;

use clap::CommandFactory;

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(
        std::env::args_os()
            .nth(1)
            .unwrap_or_else(|| "target/man".into()),
    );
    std::fs::create_dir_all(&dir)?;
    let cmd = extblk::cli::Cli::command();
    clap_mangen::generate_to(cmd, &dir)?;
    println!("man pages in {}", dir.display());
    Ok(())
}
