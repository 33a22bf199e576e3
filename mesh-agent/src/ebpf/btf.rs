//! Struct member offsets from the kernel's BTF (`/sys/kernel/btf/vmlinux`), for the tracepoint
//! programs that read kernel structures (mesh-common's `pods`). Only what that needs: find a
//! struct by name and a member's byte offset, looking into anonymous struct and union members.
//! The format is the kernel's `Documentation/bpf/btf.rst`.

use std::collections::HashMap;

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

/// The offsets the cgroup tracepoint programs need.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CgroupOffsets {
    /// `struct cgroup.kn`
    pub cgroup_kn: u32,
    /// `struct cgroup.root`
    pub cgroup_root: u32,
    /// `struct kernfs_node.id`
    pub kernfs_id: u32,
    /// `struct cgroup_root.hierarchy_id`
    pub root_hierarchy: u32,
    /// `struct kernfs_node.parent` (`__parent` since Linux 6.15)
    pub kernfs_parent: u32,
}

impl CgroupOffsets {
    pub fn from_btf(btf: &[u8]) -> Result<CgroupOffsets, String> {
        let b = Btf::parse(btf)?;
        Ok(CgroupOffsets {
            cgroup_kn: b.member_offset("cgroup", "kn")?,
            cgroup_root: b.member_offset("cgroup", "root")?,
            kernfs_id: b.member_offset("kernfs_node", "id")?,
            root_hierarchy: b.member_offset("cgroup_root", "hierarchy_id")?,
            kernfs_parent: b
                .member_offset("kernfs_node", "parent")
                .or_else(|_| b.member_offset("kernfs_node", "__parent"))?,
        })
    }

    /// From the running kernel's BTF.
    pub fn of_kernel() -> Result<CgroupOffsets, String> {
        let data = std::fs::read(VMLINUX)
            .map_err(|e| format!("reading {VMLINUX}: {e} (a kernel built without CONFIG_DEBUG_INFO_BTF has no BTF)"))?;
        CgroupOffsets::from_btf(&data).map_err(|e| format!("{VMLINUX}: {e}"))
    }
}

struct Type {
    name: u32,
    kind: u32,
    /// (name, type id, offset in bits) for structs and unions.
    members: Vec<(u32, u32, u32)>,
}

struct Btf<'a> {
    strings: &'a [u8],
    /// Index 0 is type id 1.
    types: Vec<Type>,
    structs: HashMap<&'a str, u32>,
}

fn u16_at(d: &[u8], at: usize) -> Result<u16, String> {
    d.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]])).ok_or_else(|| format!("truncated at byte {at}"))
}

fn u32_at(d: &[u8], at: usize) -> Result<u32, String> {
    d.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| format!("truncated at byte {at}"))
}

impl<'a> Btf<'a> {
    fn parse(d: &'a [u8]) -> Result<Btf<'a>, String> {
        if u16_at(d, 0)? != MAGIC {
            return Err("not BTF (bad magic; only little-endian BTF is read)".into());
        }
        let hdr_len = u32_at(d, 4)? as usize;
        let (type_off, type_len) = (u32_at(d, 8)? as usize, u32_at(d, 12)? as usize);
        let (str_off, str_len) = (u32_at(d, 16)? as usize, u32_at(d, 20)? as usize);
        let section = |off: usize, len: usize| {
            hdr_len.checked_add(off).and_then(|s| Some((s, s.checked_add(len)?))).and_then(|(s, e)| d.get(s..e))
        };
        let types_sec = section(type_off, type_len).ok_or("the type section is outside the data")?;
        let strings = section(str_off, str_len).ok_or("the string section is outside the data")?;
        let mut types = Vec::new();
        let mut at = 0;
        while at < types_sec.len() {
            let name = u32_at(types_sec, at)?;
            let info = u32_at(types_sec, at + 4)?;
            let (kind, vlen, kflag) = ((info >> 24) & 0x1f, (info & 0xffff) as usize, info >> 31 == 1);
            at += 12;
            let mut members = Vec::new();
            let extra = match kind {
                1 | 14 | 17 => 4, // INT, VAR, DECL_TAG
                3 => 12,          // ARRAY
                KIND_STRUCT | KIND_UNION => {
                    for m in 0..vlen {
                        let p = at + m * 12;
                        let off = u32_at(types_sec, p + 8)?;
                        // With kind_flag the low 24 bits are the bit offset (the rest a bitfield size).
                        let bits = if kflag { off & 0xff_ffff } else { off };
                        members.push((u32_at(types_sec, p)?, u32_at(types_sec, p + 4)?, bits));
                    }
                    vlen * 12
                }
                6 | 13 => vlen * 8,        // ENUM, FUNC_PROTO
                15 | 19 => vlen * 12,      // DATASEC, ENUM64
                2 | 7..=12 | 16 | 18 => 0, // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
                k => return Err(format!("unknown BTF kind {k} (type {})", types.len() + 1)),
            };
            at += extra;
            types.push(Type { name, kind, members });
        }
        let mut b = Btf { strings, types, structs: HashMap::new() };
        for (i, t) in b.types.iter().enumerate() {
            if t.kind == KIND_STRUCT && t.name != 0 {
                // The first struct of a name: vmlinux has one per name.
                b.structs.entry(b.string(t.name)?).or_insert(i as u32 + 1);
            }
        }
        Ok(b)
    }

    fn string(&self, off: u32) -> Result<&'a str, String> {
        let s = self.strings.get(off as usize..).ok_or_else(|| format!("string offset {off} is outside the data"))?;
        let end = s.iter().position(|b| *b == 0).ok_or("an unterminated string")?;
        std::str::from_utf8(&s[..end]).map_err(|_| "a string that is not UTF-8".into())
    }

    fn ty(&self, id: u32) -> Option<&Type> {
        id.checked_sub(1).and_then(|i| self.types.get(i as usize))
    }

    /// The byte offset of `member` in struct `name`.
    fn member_offset(&self, name: &str, member: &str) -> Result<u32, String> {
        let id = *self.structs.get(name).ok_or_else(|| format!("no struct {name}"))?;
        let bits = self.find(id, member, 0, 0)?.ok_or_else(|| format!("struct {name} has no member {member}"))?;
        if !bits.is_multiple_of(8) {
            return Err(format!("{name}.{member} is a bitfield"));
        }
        Ok(bits / 8)
    }

    /// `member`'s offset in bits from the start of type `id`, plus `base`; members of anonymous
    /// structs and unions count as the outer type's.
    fn find(&self, id: u32, member: &str, base: u32, depth: u32) -> Result<Option<u32>, String> {
        let Some(t) = self.ty(id) else { return Ok(None) };
        if depth > 8 {
            return Ok(None);
        }
        for &(name, ty, off) in &t.members {
            let at = base.checked_add(off).ok_or("a member offset out of range")?;
            if name != 0 && self.string(name)? == member {
                return Ok(Some(at));
            }
            let anonymous = name == 0 && self.ty(ty).is_some_and(|m| m.kind == KIND_STRUCT || m.kind == KIND_UNION);
            if anonymous {
                if let Some(o) = self.find(ty, member, at, depth + 1)? {
                    return Ok(Some(o));
                }
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob built by hand: `struct cgroup { int a; union { long b; struct kernfs_node *kn; };
    /// struct cgroup_root *root; }` and the rest, with types of other kinds between them.
    fn blob() -> Vec<u8> {
        let mut strings = vec![0u8];
        let mut s = |n: &str| {
            let at = strings.len() as u32;
            strings.extend_from_slice(n.as_bytes());
            strings.push(0);
            at
        };
        let names: Vec<u32> = [
            "int",
            "cgroup",
            "a",
            "kn",
            "root",
            "kernfs_node",
            "id",
            "cgroup_root",
            "hierarchy_id",
            "b",
            "u64",
            "__parent",
        ]
        .iter()
        .map(|n| s(n))
        .collect();
        let mut t = Vec::new();
        let mut ty = |name: u32, kind: u32, vlen: u32, size: u32, extra: &[u32]| {
            for w in [name, (kind << 24) | vlen, size].iter().chain(extra) {
                t.extend_from_slice(&w.to_le_bytes());
            }
        };
        ty(names[0], 1, 0, 4, &[32]); // 1: int
        ty(names[10], 1, 0, 8, &[64]); // 2: u64
        ty(0, 2, 0, 8, &[]); // 3: ptr to kernfs_node
        ty(0, 2, 0, 9, &[]); // 4: ptr to cgroup_root
        ty(0, 5, 2, 8, &[names[9], 2, 0, names[3], 3, 0]); // 5: union { b; kn }
        ty(names[1], 4, 3, 24, &[names[2], 1, 0, 0, 5, 64, names[4], 4, 128]); // 6: struct cgroup
        ty(0, 13, 1, 1, &[0, 1]); // 7: a func proto, skipped
        ty(names[5], 4, 2, 16, &[names[11], 3, 0, names[6], 2, 64]); // 8: struct kernfs_node { __parent; id at 8 }
        ty(names[7], 4, 1, 8, &[names[8], 1, 32]); // 9: struct cgroup_root { .., hierarchy_id at 4 }
        let mut d = Vec::new();
        for w in [0x0001_eb9fu32, 24, 0, t.len() as u32, t.len() as u32, strings.len() as u32] {
            d.extend_from_slice(&w.to_le_bytes());
        }
        d.extend(t);
        d.extend(strings);
        d
    }

    #[test]
    fn offsets_are_found_through_anonymous_unions() {
        let o = CgroupOffsets::from_btf(&blob()).unwrap();
        assert_eq!(
            o,
            CgroupOffsets { cgroup_kn: 8, cgroup_root: 16, kernfs_id: 8, root_hierarchy: 4, kernfs_parent: 0 }
        );
    }

    #[test]
    fn bad_data_is_an_error_not_a_panic() {
        let good = blob();
        for cut in [0, 3, 23, 30, good.len() - 1] {
            assert!(CgroupOffsets::from_btf(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = good.clone();
        bad[0] = 0;
        assert!(CgroupOffsets::from_btf(&bad).unwrap_err().contains("magic"));
    }

    /// The running kernel's BTF (the machines this is built and tested on have one): the
    /// members exist and lie where a u64 or a pointer may.
    #[test]
    fn the_running_kernels_btf_names_the_members() {
        let o = CgroupOffsets::of_kernel().unwrap();
        assert!(o.cgroup_kn > 0 && o.cgroup_kn.is_multiple_of(8), "{o:?}");
        assert!(
            o.cgroup_root.is_multiple_of(8) && o.kernfs_id.is_multiple_of(8) && o.root_hierarchy.is_multiple_of(4),
            "{o:?}"
        );
    }
}
