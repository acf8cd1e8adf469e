import ParleyWire

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzWireDecoder(_ start: UnsafeRawPointer, _ count: Int) -> CInt {
    _FuzzHarness.run(UnsafeRawBufferPointer(start: start, count: count))
    return 0
}
