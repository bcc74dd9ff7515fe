//! Build script: records the commit the proxy is built from as `XKS_BUILD_COMMIT`, for
//! `xks-proxy --version` and the `xks_build_info` metric. Set `XKS_BUILD_COMMIT` in the build's
//! environment to choose it (a build without `.git`, e.g. a container image); otherwise
//! `git rev-parse --short HEAD`, and nothing (the binary says `unknown`) without git or `.git`.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    let text = text.trim();
    (output.status.success() && !text.is_empty()).then(|| text.to_string())
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=XKS_BUILD_COMMIT");
    if std::env::var_os("XKS_BUILD_COMMIT").is_some() {
        return; // rustc sees the variable itself
    }
    let Some(commit) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return;
    };
    println!("cargo:rustc-env=XKS_BUILD_COMMIT={commit}");
    // Run again when HEAD moves: a new commit on the branch, or another branch checked out.
    for path in ["HEAD", "packed-refs"] {
        if let Some(file) = git(&["rev-parse", "--git-path", path])
            && std::path::Path::new(&file).exists()
        {
            println!("cargo:rerun-if-changed={file}");
        }
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"])
        && let Some(file) = git(&["rev-parse", "--git-path", &branch])
        && std::path::Path::new(&file).exists()
    {
        println!("cargo:rerun-if-changed={file}");
    }
}
