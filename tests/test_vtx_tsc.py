"""hvm.vtx.tsc: TSC offsetting and scaling (SDM 25.6.5, 26.3), and nested composition."""

from hypothesis import given
from hypothesis import strategies as st

from hvm.vtx.controls import ProcBased, ProcBased2
from hvm.vtx.tsc import TSC_MULTIPLIER_ONE, TscLevel, compose
from hvm.vtx.vmcs import VMCS, VmcsField

ONE = TSC_MULTIPLIER_ONE
u64 = st.integers(0, 2**64 - 1)
s64 = st.integers(-(2**63), 2**63 - 1)


def vmcs_with(proc: int, proc2: int = 0, offset: int = 0, multiplier: int = 0) -> VMCS:
    vmcs = VMCS()
    if proc2:
        proc |= ProcBased.ACTIVATE_SECONDARY_CONTROLS
    vmcs.vmwrite(VmcsField.CPU_BASED_VM_EXEC_CONTROL, proc)
    vmcs.vmwrite(VmcsField.SECONDARY_VM_EXEC_CONTROL, proc2)
    vmcs.vmwrite(VmcsField.TSC_OFFSET, offset)
    vmcs.vmwrite(VmcsField.TSC_MULTIPLIER, multiplier)
    return vmcs


def test_multiplier_one_is_2_to_the_48():
    # SDM 25.6.5: 48 fractional bits.
    assert ONE == 0x1_0000_0000_0000


def test_offset_only():
    assert TscLevel(offset=-100).apply(1000) == 900
    # The sum is taken modulo 2^64: 5 - 10 wraps to 2^64 - 5.
    assert TscLevel(offset=-10).apply(5) == 2**64 - 5


def test_scaling_then_offset():
    # 2.0 = 2 << 48: 1000 * (2 << 48) >> 48 = 2000, plus the offset 7.
    assert TscLevel(offset=7, multiplier=2 * ONE).apply(1000) == 2007
    # 0.5 = 1 << 47: 1001 * 2^47 >> 48 = 500 (the fraction is dropped).
    assert TscLevel(multiplier=1 << 47).apply(1001) == 500
    # 1.5: 3 * 2^47; 2^62 * 1.5 = 3 * 2^61, then + 1.
    assert TscLevel(offset=1, multiplier=3 << 47).apply(1 << 62) == 3 * (1 << 61) + 1
    # The 128-bit product keeps its high bits: (2^64 - 1) * 2.0 >> 48 overflows and wraps mod 2^64.
    assert TscLevel(multiplier=2 * ONE).apply(2**64 - 1) == 2**64 - 2


def test_from_vmcs_follows_the_controls():
    host = 10**12
    # SDM 26.3: "use TSC offsetting" 0 -> the host TSC, even with scaling on.
    assert TscLevel.from_vmcs(vmcs_with(0, ProcBased2.USE_TSC_SCALING, -5, 2 * ONE)).apply(host) == host
    # Offsetting only: the multiplier field is not used.
    offset_only = vmcs_with(ProcBased.USE_TSC_OFFSETTING, 0, -5, 2 * ONE)
    assert TscLevel.from_vmcs(offset_only) == TscLevel(-5)
    # Scaling needs "activate secondary controls": without it the secondary control reads as 0.
    inactive = vmcs_with(ProcBased.USE_TSC_OFFSETTING, 0, -5, 2 * ONE)
    inactive.vmwrite(VmcsField.SECONDARY_VM_EXEC_CONTROL, ProcBased2.USE_TSC_SCALING)
    assert TscLevel.from_vmcs(inactive).apply(host) == host - 5
    both = vmcs_with(ProcBased.USE_TSC_OFFSETTING, ProcBased2.USE_TSC_SCALING, -5, 2 * ONE)
    assert TscLevel.from_vmcs(both).apply(host) == 2 * host - 5


def test_compose_with_unit_multipliers_adds_offsets():
    # T_L2 = T_H + d1 + d2.
    l1, l2 = TscLevel(offset=-1_000), TscLevel(offset=250)
    assert compose([l1, l2]) == TscLevel(offset=-750)
    assert compose([l1, l2]).apply(10_000) == 9_250
    assert compose([]) == TscLevel()


def test_compose_scaled_levels():
    # L1 = 2*T_H + 10, L2 = 3*L1 - 4 = 6*T_H + 26.
    composite = compose([TscLevel(10, 2 * ONE), TscLevel(-4, 3 * ONE)])
    assert composite == TscLevel(26, 6 * ONE)


@given(u64, st.lists(st.tuples(s64, st.integers(1, 4)), max_size=4))
def test_compose_equals_applying_levels_in_turn(host, params):
    levels = [TscLevel(offset, whole * ONE) for offset, whole in params]
    stacked = host
    for level in levels:
        stacked = level.apply(stacked)
    assert compose(levels).apply(host) == stacked
