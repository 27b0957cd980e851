use super::*;

fn key(byte: u8) -> VolumeKey {
    VolumeKey::from_bytes(&[byte; KEY_BYTES]).unwrap()
}

/// A stand-in `cryptsetup` that records each argv (one line) and each stdin (hex), and exits
/// with the code in `exit` (0 when absent).
fn recording_program(dir: &Path) -> CryptsetupCommand {
    let script = dir.join("cryptsetup");
    let text = format!(
        "#!/bin/sh\necho \"$*\" >> {d}/argv\nod -An -tx1 -v | tr -d ' \\n' >> {d}/stdin\necho >> {d}/stdin\nexit $(cat {d}/exit 2>/dev/null || echo 0)\n",
        d = dir.display()
    );
    // Written by a child process: a file this process held open for writing would be
    // inherited by whatever another test thread forks meanwhile, and executing it would then
    // fail with ETXTBSY ("Text file busy") until that child has exec'd.
    let mut writer = std::process::Command::new("sh")
        .args(["-c", "cat > \"$0\" && chmod 755 \"$0\""])
        .arg(&script)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut writer.stdin.take().unwrap(), text.as_bytes()).unwrap();
    assert!(writer.wait().unwrap().success());
    CryptsetupCommand {
        program: script,
        timeout: Duration::from_secs(10),
    }
}

#[test]
fn every_call_has_the_key_on_stdin_only() {
    let dir = tempfile::tempdir().unwrap();
    let c = recording_program(dir.path());
    let device = Path::new("/var/lib/berth/volumes/acme.img");
    let k = key(0xab);
    c.format(device, &k).unwrap();
    assert!(c.is_luks(device).unwrap());
    c.dump(device).unwrap();
    assert!(c.key_opens(device, &k).unwrap());
    c.open(device, "berth-acme", &k).unwrap();
    c.close("berth-acme").unwrap();
    c.erase(device).unwrap();
    let argv = std::fs::read_to_string(dir.path().join("argv")).unwrap();
    assert_eq!(
        argv.lines().collect::<Vec<_>>(),
        [
            "luksFormat --type luks2 --batch-mode --key-file - --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --label berth /var/lib/berth/volumes/acme.img",
            "isLuks /var/lib/berth/volumes/acme.img",
            "luksDump /var/lib/berth/volumes/acme.img",
            "open --test-passphrase --key-file - /var/lib/berth/volumes/acme.img",
            "open --type luks2 --key-file - /var/lib/berth/volumes/acme.img berth-acme",
            "close berth-acme",
            "luksErase --batch-mode /var/lib/berth/volumes/acme.img",
        ]
    );
    let hex = "ab".repeat(KEY_BYTES);
    assert!(!argv.contains(&hex), "no key in argv");
    let stdin: Vec<String> = std::fs::read_to_string(dir.path().join("stdin"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    // Keyed calls got exactly the key; the others got nothing (stdin is /dev/null).
    assert_eq!(
        stdin,
        [hex.as_str(), "", "", hex.as_str(), hex.as_str(), "", ""]
    );
    assert_eq!(format!("{k:?}"), "VolumeKey(..)");
}

#[test]
fn exit_codes_mean_not_luks_and_wrong_key_other_failures_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let c = recording_program(dir.path());
    let device = Path::new("/tmp/x.img");
    std::fs::write(dir.path().join("exit"), "1").unwrap();
    assert!(!c.is_luks(device).unwrap());
    std::fs::write(dir.path().join("exit"), "2").unwrap();
    assert!(!c.key_opens(device, &key(1)).unwrap());
    std::fs::write(dir.path().join("exit"), "4").unwrap();
    let err = c.is_luks(device).unwrap_err().to_string();
    assert!(err.contains("exited with exit status: 4"), "{err}");
    assert!(c.key_opens(device, &key(1)).is_err());
    assert_eq!(
        VolumeKey::from_bytes(&[0; 16]).unwrap_err().to_string(),
        "a volume key must be 32 bytes, not 16"
    );
}

/// The real cryptsetup on a sparse file: everything that works without device-mapper.
#[test]
fn real_luks2_format_check_dump_and_erase_on_a_file() {
    let have = std::process::Command::new("cryptsetup")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        assert!(
            std::env::var("BERTH_REQUIRE_REAL").ok().as_deref() != Some("1"),
            "cryptsetup is required (BERTH_REQUIRE_REAL=1)"
        );
        eprintln!("SKIPPED: needs cryptsetup");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let device = dir.path().join("tenant.img");
    std::fs::File::create(&device)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let plain = dir.path().join("plain.img");
    std::fs::write(&plain, vec![0u8; 1 << 20]).unwrap();
    let c = CryptsetupCommand::default();
    let (right, wrong) = (key(7), key(8));
    assert!(!c.is_luks(&device).unwrap(), "not formatted yet");
    c.format(&device, &right).unwrap();
    assert!(c.is_luks(&device).unwrap());
    assert!(!c.is_luks(&plain).unwrap());
    let dump = c.dump(&device).unwrap();
    assert!(dump.contains("Version:       \t2"), "{dump}");
    assert!(dump.contains("PBKDF:      pbkdf2"), "{dump}");
    assert!(dump.contains("Label:         \tberth"), "{dump}");
    assert!(c.key_opens(&device, &right).unwrap());
    assert!(!c.key_opens(&device, &wrong).unwrap());
    // The key bytes are nowhere in the header.
    let header = std::fs::read(&device).unwrap();
    assert!(!header.windows(KEY_BYTES).any(|w| w == [7u8; KEY_BYTES]));
    c.erase(&device).unwrap();
    assert!(!c.key_opens(&device, &right).unwrap(), "crypto-shredded");
    let missing = c
        .is_luks(&dir.path().join("nosuch.img"))
        .unwrap_err()
        .to_string();
    assert!(missing.contains("cryptsetup exited"), "{missing}");
}
