//! Readers for the benchmark inputs in ../shared/bench (see its README).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, bail};
use berth_coordinator::placement::scheduler::offline::Instance;

/// A `.vbp` file: dimensions, capacities, item types with demands.
pub fn read_vbp(path: &Path) -> anyhow::Result<Instance> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let mut numbers = text.split_whitespace().map(|t| {
        t.parse::<u64>()
            .with_context(|| format!("{}: {t:?} is not a number", path.display()))
    });
    let mut next = || {
        numbers
            .next()
            .unwrap_or_else(|| bail!("{}: ends early", path.display()))
    };
    let dims = next()? as usize;
    let capacity = (0..dims)
        .map(|_| next())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let kinds = next()?;
    let mut items = Vec::new();
    for _ in 0..kinds {
        let sizes = (0..dims)
            .map(|_| next())
            .collect::<anyhow::Result<Vec<_>>>()?;
        let demand = next()?;
        for _ in 0..demand {
            items.push(sizes.clone());
        }
    }
    Ok(Instance { capacity, items })
}

/// What the summary knows of an instance: (lower bound, optimum if known, best published).
pub type Known = (u64, Option<u64>, u64);

/// Per instance name, from Panigrahy_summary_known.csv.
pub fn read_summary(path: &Path) -> anyhow::Result<HashMap<String, Known>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let mut out = HashMap::new();
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        if cols.len() < 4 {
            continue;
        }
        let opt: i64 = cols[2]
            .parse()
            .with_context(|| format!("OPT of {}", cols[0]))?;
        out.insert(
            cols[0].to_string(),
            (
                cols[1].parse()?,
                (opt > 0).then_some(opt as u64),
                cols[3].parse()?,
            ),
        );
    }
    Ok(out)
}

/// One VM of the Azure trace: arrival, departure (seconds), CPU (millicores), memory (MiB).
#[derive(Debug, Clone, Copy)]
pub struct Vm {
    pub arrive: u64,
    pub depart: u64,
    pub cpu: u64,
    pub mem: u64,
}

/// The trace end: censored VMs run until then.
pub const TRACE_END: u64 = 2_100_000;

pub fn read_azure(dir: &Path, limit: Option<usize>) -> anyhow::Result<Vec<Vm>> {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .with_context(|| dir.join(name).display().to_string())
    };
    let mut flavours = HashMap::new();
    for line in read("flav_map.txt")?
        .lines()
        .filter(|l| !l.trim().is_empty())
    {
        let (spec, letter) = line
            .split_once(' ')
            .context("flav_map.txt: expected `vCPU,GB LETTER`")?;
        let (cpu, gb) = spec
            .split_once(',')
            .context("flav_map.txt: expected `vCPU,GB`")?;
        let cpu: f64 = cpu.parse()?;
        let gb: f64 = gb.parse()?;
        flavours.insert(
            letter.trim().to_string(),
            ((cpu * 1000.0) as u64, (gb * 1024.0) as u64),
        );
    }
    // Bin b spans from its smallest lower bound to the next bin's; a VM lasts the midpoint.
    let mut lower: Vec<u64> = Vec::new();
    for line in read("v1.interval_map.txt")?
        .lines()
        .filter(|l| !l.trim().is_empty())
    {
        let (secs, bin) = line
            .split_once(' ')
            .context("v1.interval_map.txt: expected `SECONDS BIN`")?;
        let (secs, bin): (u64, usize) = (secs.parse()?, bin.trim().parse()?);
        if bin >= lower.len() {
            lower.resize(bin + 1, u64::MAX);
        }
        lower[bin] = lower[bin].min(secs);
    }
    let duration = |bin: usize| -> u64 {
        match (lower.get(bin), lower.get(bin + 1)) {
            (Some(a), Some(b)) if *b != u64::MAX => (a + b) / 2,
            (Some(a), _) => *a,
            _ => 0,
        }
    };
    let arrivals = read("v1.dev.txt")?;
    let durations = read("v1.dev.c2100000.txt")?;
    let mut vms = Vec::new();
    for (a, d) in arrivals.lines().zip(durations.lines()) {
        let (t, seq) = a
            .split_once(' ')
            .context("v1.dev.txt: expected `TIMESTAMP SEQ`")?;
        let (_, dseq) = d
            .split_once(' ')
            .context("v1.dev.c2100000.txt: expected `TIMESTAMP SEQ`")?;
        let t: u64 = t.parse()?;
        for (f, d) in seq.split(',').zip(dseq.split(',')) {
            if f == "|" || f.is_empty() {
                continue;
            }
            let &(cpu, mem) = flavours
                .get(f)
                .with_context(|| format!("unknown flavour {f:?}"))?;
            let depart = match d.split_at(1) {
                ("U", bin) => t + duration(bin.parse()?),
                ("C", _) => TRACE_END,
                _ => bail!("duration {d:?}: expected U<bin> or C<bin>"),
            };
            vms.push(Vm {
                arrive: t,
                depart: depart.min(TRACE_END).max(t),
                cpu,
                mem,
            });
            if limit.is_some_and(|l| vms.len() >= l) {
                return Ok(vms);
            }
        }
    }
    Ok(vms)
}
