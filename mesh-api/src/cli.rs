//! The conventions every sockmesh binary's command line keeps, checked by each binary's tests.

/// Flags and subcommands, at any depth, that say nothing in `--help`.
pub fn missing_help(cmd: &clap::Command) -> Vec<String> {
    let mut missing = Vec::new();
    for a in cmd.get_arguments() {
        if a.get_help().is_none() && !matches!(a.get_id().as_str(), "help" | "version") {
            missing.push(format!("{} --{}", cmd.get_name(), a.get_id()));
        }
    }
    for s in cmd.get_subcommands() {
        if s.get_about().is_none() && s.get_name() != "help" {
            missing.push(format!("{} {}", cmd.get_name(), s.get_name()));
        }
        missing.extend(missing_help(s));
    }
    missing
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_flag_or_subcommand_without_help_is_named() {
        let cmd = clap::Command::new("x")
            .arg(clap::Arg::new("quiet").long("quiet").help("Say less"))
            .arg(clap::Arg::new("loud").long("loud"))
            .subcommand(clap::Command::new("run").arg(clap::Arg::new("n").long("n")));
        assert_eq!(super::missing_help(&cmd), ["x --loud", "x run", "run --n"]);
    }
}
