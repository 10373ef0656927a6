//! The `mailbridge` binary: see `mailbridge --help`.

fn main() -> std::process::ExitCode {
    mailbridge::cli::main()
}
