//! The `nibble` binary: the command line lives in the library ([`nibble_driver::cli`]).

fn main() {
    std::process::exit(nibble_driver::cli::main_with_args(std::env::args_os().collect()))
}
