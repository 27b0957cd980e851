use super::*;

fn el(net: &str, protocol: Protocol, port: u16) -> Element {
    Element {
        net: Prefix::parse(net).unwrap(),
        protocol,
        port,
    }
}

fn rules(tenant: &str, subnet: &str, elements: &[Element]) -> TenantRules {
    TenantRules {
        chain: chain(&TenantId::new(tenant).unwrap()),
        subnet: Prefix::parse(subnet).unwrap(),
        elements: elements.iter().copied().collect(),
    }
}

#[test]
fn prefixes_are_canonical_and_covered_elements_dropped() {
    assert_eq!(
        Prefix::parse("10.1.2.3/24").unwrap().to_string(),
        "10.1.2.0/24"
    );
    assert_eq!(Prefix::parse("10.1.2.3").unwrap().to_string(), "10.1.2.3");
    assert_eq!(Prefix::parse("0.0.0.0/0").unwrap().to_string(), "0.0.0.0/0");
    assert!(Prefix::parse("10.1.2.3/33").is_none());
    assert!(Prefix::parse("::1").is_none());
    let wide = el("10.0.0.0/8", Protocol::Tcp, 443);
    let inside = el("10.1.2.3", Protocol::Tcp, 443);
    let other_port = el("10.1.2.3", Protocol::Tcp, 80);
    let set = normalize([inside, wide, other_port, wide]);
    assert_eq!(set, BTreeSet::from([wide, other_port]));
    assert!(validate_table("berth").is_ok());
    assert!(validate_table("berth_t1").is_ok());
    for bad in [
        "",
        "Berth",
        "1berth",
        "berth;flush ruleset",
        &"b".repeat(33),
    ] {
        assert!(validate_table(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn scripts_touch_only_berths_table_and_updates_only_elements() {
    let base = base_script("berth", &BTreeSet::from([Ipv4Addr::new(192, 0, 2, 53)]));
    assert!(base.contains("add element inet berth resolvers { 192.0.2.53 }"));
    let a = el("203.0.113.0/24", Protocol::Tcp, 443);
    let b = el("198.51.100.7", Protocol::Udp, 123);
    let want = rules("acme", "10.213.0.0/28", &[a, b]);
    let create = tenant_script("berth", &want, None).unwrap();
    let c = &want.chain;
    assert!(create.contains(&format!(
        "add element inet berth {c}_allow {{ 198.51.100.7 . udp . 123, 203.0.113.0/24 . tcp . 443 }}"
    )));
    assert!(create.contains(&format!(
        "add element inet berth tenant_fwd {{ 10.213.0.0/28 : jump {c} }}"
    )));
    // The dispatch comes last, so no packet reaches a half-built chain.
    assert!(create.trim_end().ends_with(&format!("jump {c}_host }}")));
    for text in [&base, &create] {
        assert!(
            !text.contains("flush ruleset"),
            "never flush what is not berth's"
        );
        assert!(text.lines().all(|l| l.contains("inet berth")), "{text}");
    }
    let installed = InstalledTenant {
        fwd_subnet: Some(want.subnet),
        host_subnet: Some(want.subnet),
        has_set: true,
        has_deny_set: true,
        fwd_chain: true,
        host_chain: true,
        fwd_rules: FWD_RULES,
        host_rules: HOST_RULES,
        fwd_marked: FWD_MARKED,
        elements: BTreeMap::from([(a, 5), (b, 0)]),
        withdrawn: BTreeSet::new(),
        denied_packets: 0,
    };
    assert_eq!(tenant_script("berth", &want, Some(&installed)), None);
    let c2 = el("192.0.2.10", Protocol::Tcp, 8443);
    let update = tenant_script(
        "berth",
        &rules("acme", "10.213.0.0/28", &[a, c2]),
        Some(&installed),
    )
    .unwrap();
    assert_eq!(
        update,
        format!(
            "add element inet berth {c}_deny {{ 198.51.100.7 . udp . 123 }}\nadd element inet berth {c}_allow {{ 192.0.2.10 . tcp . 8443 }}\n"
        ),
        "an update only adds elements: no chain, rule or counter is rebuilt, nothing deleted"
    );
    let after = InstalledTenant {
        elements: BTreeMap::from([(a, 5), (b, 0), (c2, 0)]),
        withdrawn: BTreeSet::from([b]),
        ..installed.clone()
    };
    assert_eq!(
        InstalledTenant::after(&rules("acme", "10.213.0.0/28", &[a, c2]), Some(&installed)),
        after,
        "the model keeps counters and the withdrawn element"
    );
    let mut table = Installed {
        tenants: BTreeMap::from([(c.clone(), after.clone())]),
        ..Installed::default()
    };
    assert_eq!(
        gc_script("berth", &table).unwrap(),
        format!(
            "delete element inet berth {c}_allow {{ 198.51.100.7 . udp . 123 }}\ndelete element inet berth {c}_deny {{ 198.51.100.7 . udp . 123 }}\n"
        )
    );
    collect_garbage(&mut table);
    assert_eq!(table.tenants[c].elements, BTreeMap::from([(a, 5), (c2, 0)]));
    assert_eq!(gc_script("berth", &table), None);
    // Wanted again before the clean-up: out of the deny set.
    let again = tenant_script("berth", &want, Some(&after)).unwrap();
    assert_eq!(
        again,
        format!(
            "delete element inet berth {c}_deny {{ 198.51.100.7 . udp . 123 }}\nadd element inet berth {c}_deny {{ 192.0.2.10 . tcp . 8443 }}\n"
        )
    );
    let broken = InstalledTenant {
        fwd_rules: 1,
        ..installed.clone()
    };
    let rebuild = tenant_script("berth", &want, Some(&broken)).unwrap();
    assert!(rebuild.starts_with("delete element inet berth tenant_fwd { 10.213.0.0/28 }"));
    assert!(rebuild.contains(&format!("flush chain inet berth {c}\n")));
    // A chain made before its accepts were marked for the forward guard is rebuilt whole, with
    // every forward accept marked (and no host-chain one).
    let unmarked = InstalledTenant {
        fwd_marked: 0,
        ..installed.clone()
    };
    let rebuild = tenant_script("berth", &want, Some(&unmarked)).unwrap();
    assert!(rebuild.contains(&format!("flush chain inet berth {c}\n")));
    let marked = |chain: &str| {
        rebuild
            .lines()
            .filter(|l| l.starts_with(&format!("add rule inet berth {chain} ")))
            .filter(|l| l.contains("meta mark set meta mark | 0x10000000 accept"))
            .count()
    };
    assert_eq!(marked(c), 3, "{rebuild}");
    assert_eq!(marked(&format!("{c}_host")), 0, "{rebuild}");
    let removal = remove_script("berth", c, &installed);
    assert_eq!(removal.lines().count(), 8, "{removal}");
    assert!(removal.ends_with(&format!("delete set inet berth {c}_deny\n")));
}

fn root_and_nft() -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    let have_nft = std::process::Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !root || !have_nft {
        assert!(
            std::env::var("BERTH_REQUIRE_REAL").ok().as_deref() != Some("1"),
            "nft and root are required (BERTH_REQUIRE_REAL=1)"
        );
        eprintln!("SKIPPED: needs root and nft");
        return false;
    }
    true
}

/// A network namespace for one test, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("bnft{tag}{}", std::process::id());
        assert!(
            std::process::Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .unwrap()
                .success()
        );
        Self(name)
    }
    fn nft(&self) -> NftCommand {
        NftCommand {
            netns: Some(self.0.clone()),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

/// Every script against the real nft in a namespace made for the test: base, two tenants, an
/// update, a refused script, a removal; each step read back through the JSON parser.
#[test]
fn the_real_nft_loads_updates_lists_and_removes() {
    if !root_and_nft() {
        return;
    }
    let ns = Netns::new("a");
    let nft = ns.nft();
    let table = "berth";
    let list = || parse_listing(&nft.list(table).unwrap().expect("table exists")).unwrap();
    assert_eq!(nft.list(table).unwrap(), None, "no table yet");
    let resolvers = BTreeSet::from([Ipv4Addr::new(192, 0, 2, 53)]);
    nft.apply(&base_script(table, &resolvers)).unwrap();
    nft.apply(&base_script(table, &resolvers)).unwrap();
    let empty = list();
    assert!(empty.base_complete, "{empty:?}");
    assert_eq!(empty.resolvers, resolvers);
    assert!(empty.tenants.is_empty());

    let a = el("203.0.113.0/24", Protocol::Tcp, 443);
    let b = el("198.51.100.7", Protocol::Udp, 123);
    let acme = rules("acme", "10.213.0.0/28", &[a, b]);
    let beta = rules("beta", "10.213.0.16/28", &[a]);
    for t in [&acme, &beta] {
        nft.apply(&tenant_script(table, t, None).unwrap()).unwrap();
    }
    let both = list();
    let got = &both.tenants[&acme.chain];
    assert!(got.complete(), "{got:?}");
    assert_eq!(got.fwd_subnet, Some(acme.subnet));
    assert_eq!(got.elements, BTreeMap::from([(a, 0), (b, 0)]));
    assert!(
        tenant_script(table, &acme, Some(got)).is_none(),
        "listing round-trips"
    );
    assert!(both.tenants[&beta.chain].complete());

    // An update: one element out, one in.
    let c = el("192.0.2.10", Protocol::Tcp, 8443);
    let updated = rules("acme", "10.213.0.0/28", &[a, c]);
    nft.apply(&tenant_script(table, &updated, Some(got)).unwrap())
        .unwrap();
    let withdrawn = list();
    let w = &withdrawn.tenants[&acme.chain];
    assert_eq!(w.withdrawn, BTreeSet::from([b]), "{w:?}");
    assert_eq!(
        InstalledTenant::after(&updated, Some(got)),
        *w,
        "the model after an update is what nft lists"
    );
    assert!(
        tenant_script(table, &updated, Some(w)).is_none(),
        "in force as listed"
    );
    let mut model = withdrawn.clone();
    nft.apply(&gc_script(table, &model).unwrap()).unwrap();
    collect_garbage(&mut model);
    let after = list();
    assert_eq!(
        after, model,
        "the model after the clean-up is what nft lists"
    );
    let t = &after.tenants[&acme.chain];
    assert!(t.withdrawn.is_empty() && t.complete(), "{t:?}");
    assert_eq!(
        t.elements.keys().copied().collect::<BTreeSet<_>>(),
        updated.elements
    );

    // A script nft refuses changes nothing (one transaction).
    let bad = format!(
        "add element inet {table} {}_allow {{ 192.0.2.99 . tcp . 22 }}\nadd rule inet {table} nosuchchain accept\n",
        acme.chain
    );
    let err = nft.apply(&bad).unwrap_err().to_string();
    assert!(
        err.contains("nosuchchain"),
        "nft's own message is kept: {err}"
    );
    assert_eq!(list(), after, "a refused script leaves the previous rules");

    // Removal leaves nothing of the tenant; the other stays.
    nft.apply(&remove_script(
        table,
        &acme.chain,
        &after.tenants[&acme.chain],
    ))
    .unwrap();
    let left = list();
    assert!(!left.tenants.contains_key(&acme.chain), "{left:?}");
    assert!(left.tenants[&beta.chain].complete());
    let text = std::process::Command::new("ip")
        .args([
            "netns", "exec", &ns.0, "nft", "list", "table", "inet", table,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(!text.contains(&acme.chain), "{text}");
}

/// A half-built tenant (a chain flushed by hand) is rebuilt whole by the next script.
#[test]
fn the_real_nft_rebuilds_a_damaged_tenant() {
    if !root_and_nft() {
        return;
    }
    let ns = Netns::new("b");
    let nft = ns.nft();
    nft.apply(&base_script("berth", &BTreeSet::new())).unwrap();
    let t = rules(
        "acme",
        "10.213.0.0/28",
        &[el("203.0.113.0/24", Protocol::Tcp, 443)],
    );
    nft.apply(&tenant_script("berth", &t, None).unwrap())
        .unwrap();
    nft.apply(&format!("flush chain inet berth {}\n", t.chain))
        .unwrap();
    let damaged = parse_listing(&nft.list("berth").unwrap().unwrap()).unwrap();
    let d = &damaged.tenants[&t.chain];
    assert!(!d.complete());
    nft.apply(&tenant_script("berth", &t, Some(d)).unwrap())
        .unwrap();
    let repaired = parse_listing(&nft.list("berth").unwrap().unwrap()).unwrap();
    assert!(repaired.tenants[&t.chain].complete());
}

#[test]
fn a_listing_is_read_item_by_item_and_a_broken_one_refused() {
    let listing = r#"{"nftables": [
        {"metainfo": {"json_schema_version": 1}},
        {"chain": {"family": "inet", "table": "berth", "name": "t_0123456789abc"}},
        {"rule": {"chain": "t_0123456789abc", "expr": [{"counter": {"packets": 3, "bytes": 180}}, {"reject": {"type": "icmpx"}}]}},
        {"set": {"name": "resolvers", "elem": ["10.0.0.53"]}}
    ], "trailing": {"ignored": [1, 2]}}"#;
    let installed = parse_listing(listing).unwrap();
    let acme = &installed.tenants["t_0123456789abc"];
    assert!(acme.fwd_chain);
    assert_eq!((acme.fwd_rules, acme.denied_packets), (1, 3));
    assert_eq!(installed.resolvers.len(), 1);
    assert!(!installed.base_complete, "no maps, no base rules");

    assert_eq!(
        parse_listing(r#"{"other": []}"#).unwrap_err().to_string(),
        "nft -j printed no \"nftables\" array"
    );
    for broken in [r#"{"nftables": [{"chain": "#, r#"{"nftables": []} x"#, "[]"] {
        assert!(
            parse_listing(broken)
                .unwrap_err()
                .to_string()
                .starts_with("nft -j printed invalid JSON: "),
            "{broken}"
        );
    }
}
