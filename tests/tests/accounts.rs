//! Accounts as replicated configuration, through the CLI against real
//! processes: a user made in one DC is there, with its password, keys,
//! grants and tokens, in the other; bad input gets a clear error.

use std::io::Write as _;
use std::process::{Command as Proc, Stdio};
use std::time::Duration;

use mailbox_testkit::{mailbox_cli_bin, wait_for, DcOptions, TestCluster};

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl demo@host\n";

/// Runs the CLI against `dc` with `stdin`; (success, stdout, stderr).
fn cli(dc: &[String], args: &[&str], stdin: &str) -> anyhow::Result<(bool, String, String)> {
    let mut cmd = Proc::new(mailbox_cli_bin()?);
    for ep in dc {
        cmd.arg("--endpoint").arg(ep);
    }
    let mut child = cmd
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn users(dc: &[String]) -> anyhow::Result<serde_json::Value> {
    let (ok, out, err) = cli(dc, &["--json", "user", "ls"], "")?;
    anyhow::ensure!(ok, "user ls: {err}");
    Ok(serde_json::from_str(out.trim())?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_made_in_one_dc_is_there_in_the_other() -> anyhow::Result<()> {
    let opts = DcOptions {
        nodes: 1,
        ..Default::default()
    };
    let mut cl = TestCluster::start(&["east", "west"], opts, "").await?;
    let t = Duration::from_secs(30);
    cl.dc("east").wait_leader(t).await?;
    cl.dc("west").wait_leader(t).await?;
    let dir = tempfile::tempdir()?;
    let key = dir.path().join("demo.pub");
    std::fs::write(&key, KEY)?;
    let east = &cl.dc("east").endpoints();
    let (ok, _, err) = cli(
        east,
        &[
            "user",
            "add",
            "demo",
            "--root",
            "/partners/demo",
            "--password-stdin",
            "--key-file",
            key.to_str().unwrap(),
        ],
        "s3cret\n",
    )?;
    assert!(ok, "{err}");
    let (ok, _, err) = cli(
        east,
        &[
            "user",
            "grant",
            "demo",
            "/partners/demo/inbox",
            "list,upload",
        ],
        "",
    )?;
    assert!(ok, "{err}");
    let (ok, token, err) = cli(east, &["user", "token", "add", "demo", "--label", "ci"], "")?;
    assert!(ok, "{err}");
    assert!(token.trim().starts_with("mbx_"), "{token}");

    // West has all of it (nothing secret is listed).
    let west = &cl.dc("west").endpoints();
    let seen = wait_for(t, "west to list demo with its grant and token", || async {
        let u = users(west).ok()?;
        let d = u.as_array()?.iter().find(|u| u["name"] == "demo")?.clone();
        (d["grants"].as_array()?.len() == 1 && d["tokens"].as_array()?.len() == 1).then_some(d)
    })
    .await?;
    assert_eq!(seen["root"], "/partners/demo");
    assert_eq!(seen["has_password"], true);
    assert_eq!(seen["keys"][0]["algorithm"], "ssh-ed25519");
    assert_eq!(seen["grants"][0]["perms"], "list,upload");
    let listing = serde_json::to_string(&users(west)?)?;
    assert!(!listing.contains("argon2") && !listing.contains(token.trim()));

    // An API client changing only the password keeps the user's root.
    let client = cl.dc("west").client().await?;
    client
        .accounts()
        .put_user(mailbox_proto::v1::PutUserRequest {
            name: "demo".into(),
            password: "n3w".into(),
            ..Default::default()
        })
        .await?;
    let after = users(west)?;
    let d = after
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "demo")
        .unwrap();
    assert_eq!(d["root"], "/partners/demo", "{d}");

    // Bad input: a clear error, nothing written.
    let (ok, _, err) = cli(
        west,
        &["user", "grant", "demo", "/partners/demo", "lsit"],
        "",
    )?;
    assert!(!ok && err.contains("lsit"), "{err}");
    let (ok, _, err) = cli(west, &["user", "add", "demo", "--password-stdin"], "x\n")?;
    assert!(!ok && err.contains("already exists"), "{err}");
    let (ok, _, err) = cli(west, &["user", "add", "Bad Name"], "")?;
    assert!(!ok && err.contains("user name"), "{err}");
    let (ok, _, err) = cli(west, &["user", "grant", "nobody", "/x", "list"], "")?;
    assert!(!ok && err.contains("nobody"), "{err}");

    // Deleted in west: gone in east too.
    let (ok, _, err) = cli(west, &["user", "rm", "demo"], "")?;
    assert!(ok, "{err}");
    wait_for(t, "east to forget demo", || async {
        let u = users(east).ok()?;
        u.as_array()?
            .iter()
            .all(|u| u["name"] != "demo")
            .then_some(())
    })
    .await?;
    Ok(())
}
