import NIOCore
import ParleyBlock
import ParleyTestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Unit tests of the sans-IO NBD layer: the handshake state machine, the request decoder,
/// request validation and the reply encoders. No sockets, no processes.
///
/// Every helper is nested in this type so nothing clashes with other files of the target.
@Suite struct NBDProtocolTests {}

// MARK: - Fixtures

extension NBDProtocolTests {
    typealias Machine = NBDHandshakeStateMachine<TableResolver>

    /// A table of exports; records every successful open (what a real resolver would have to
    /// close again).
    struct TableResolver: NBDExportResolver {
        var exports: [NBDExportInfo]
        var refusals: [String: NBDRefusal] = [:]
        private(set) var opened: [String] = []

        init(_ exports: [NBDExportInfo], refusals: [String: NBDRefusal] = [:]) {
            self.exports = exports
            self.refusals = refusals
        }

        func listExports() -> [(name: String, description: String)] {
            self.exports.map { ($0.name, $0.description) }
        }

        func describe(_ name: String) -> Result<NBDExportInfo, NBDRefusal> {
            if let refusal = self.refusals[name] { return .failure(refusal) }
            guard let export = self.exports.first(where: { $0.name == name }) else {
                return .failure(NBDRefusal(.errUnknown, "no export named \"\(name)\""))
            }
            return .success(export)
        }

        mutating func open(_ name: String) -> Result<NBDExportInfo, NBDRefusal> {
            let result = self.describe(name)
            if case .success = result { self.opened.append(name) }
            return result
        }
    }

    static let disk = NBDExportInfo(
        name: "disk", description: "main disk", size: 1 << 20,
        flags: [.hasFlags, .sendFlush, .sendFUA, .sendTrim, .sendWriteZeroes, .sendCache],
        minimumBlockSize: 1, preferredBlockSize: 4096, maximumPayload: 64 << 10
    )
    static let readOnly = NBDExportInfo(name: "ro", size: 65536, flags: [.hasFlags, .readOnly, .sendFlush])
    static let aligned = NBDExportInfo(
        name: "aligned", size: 1 << 20, flags: [.hasFlags, .sendFlush],
        minimumBlockSize: 4096, preferredBlockSize: 4096, maximumPayload: 1 << 20
    )
    static func table() -> TableResolver { TableResolver([disk, readOnly, aligned]) }

    /// A machine whose greeting has been taken.
    static func started(_ resolver: TableResolver = table()) -> Machine {
        var machine = Machine(resolver: resolver)
        _ = machine.greeting()
        return machine
    }

    /// Big-endian byte building.
    struct Wire {
        var bytes: [UInt8] = []
        init() {}
        init(_ bytes: [UInt8]) { self.bytes = bytes }
        func u8(_ v: UInt8) -> Wire { Wire(self.bytes + [v]) }
        func u16(_ v: UInt16) -> Wire { Wire(self.bytes + withUnsafeBytes(of: v.bigEndian, Array.init)) }
        func u32(_ v: UInt32) -> Wire { Wire(self.bytes + withUnsafeBytes(of: v.bigEndian, Array.init)) }
        func u64(_ v: UInt64) -> Wire { Wire(self.bytes + withUnsafeBytes(of: v.bigEndian, Array.init)) }
        func string(_ s: String) -> Wire { Wire(self.bytes + Array(s.utf8)) }
        func raw(_ b: [UInt8]) -> Wire { Wire(self.bytes + b) }
    }

    static let optionMagic: [UInt8] = Array("IHAVEOPT".utf8)
    /// NBD_REP magic 0x3e889045565a9, written out by hand.
    static let replyMagic: [UInt8] = [0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9]
    static let requestMagic: [UInt8] = [0x25, 0x60, 0x95, 0x13]

    static func clientFlags(_ flags: UInt32) -> [UInt8] { Wire().u32(flags).bytes }

    static func option(_ code: UInt32, _ data: [UInt8] = []) -> [UInt8] {
        Wire(optionMagic).u32(code).u32(UInt32(data.count)).raw(data).bytes
    }

    static func option(_ o: NBD.Option, _ data: [UInt8] = []) -> [UInt8] { self.option(o.rawValue, data) }

    /// The data of NBD_OPT_INFO / NBD_OPT_GO.
    static func infoData(_ name: String, _ infos: [NBD.Info] = []) -> [UInt8] {
        var w = Wire().u32(UInt32(name.utf8.count)).string(name).u16(UInt16(infos.count))
        for i in infos { w = w.u16(i.rawValue) }
        return w.bytes
    }

    /// The data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
    static func metaData(_ name: String, _ queries: [String]) -> [UInt8] {
        var w = Wire().u32(UInt32(name.utf8.count)).string(name).u32(UInt32(queries.count))
        for q in queries { w = w.u32(UInt32(q.utf8.count)).string(q) }
        return w.bytes
    }

    static func reply(_ option: UInt32, _ type: UInt32, _ payload: [UInt8] = []) -> [UInt8] {
        Wire(replyMagic).u32(option).u32(type).u32(UInt32(payload.count)).raw(payload).bytes
    }

    static func reply(_ o: NBD.Option, _ type: NBD.Reply, _ payload: [UInt8] = []) -> [UInt8] {
        self.reply(o.rawValue, type.rawValue, payload)
    }

    static func array(_ b: ByteBuffer) -> [UInt8] { Array(b.readableBytesView) }

    /// What a run of the machine produced.
    struct Outcome {
        var actions: [Machine.Action] = []
        /// Every `.send`, concatenated.
        var sent: [UInt8] = []
        var transmission: NBDNegotiated?
        var disconnect: String?
        /// Bytes the machine left in the buffer.
        var rest: [UInt8] = []
        /// Actions after a terminal one (must never happen).
        var afterTerminal = 0
        /// `.startTLS` actions.
        var startTLS = 0
    }

    /// Feeds `input` in chunks of `chunk` bytes (0: all at once) into `machine`.
    static func feed(_ machine: inout Machine, _ input: [UInt8], chunk: Int = 0) -> Outcome {
        var outcome = Outcome()
        var pending = ByteBuffer()
        var at = 0
        repeat {
            let n = chunk == 0 ? input.count - at : min(chunk, input.count - at)
            pending.writeBytes(input[at..<(at + n)])
            at += n
            outcome.actions += machine.receive(&pending)
        } while at < input.count
        for action in outcome.actions {
            if outcome.transmission != nil || outcome.disconnect != nil { outcome.afterTerminal += 1 }
            switch action {
            case .send(let b): outcome.sent += self.array(b)
            case .transmission(let n): outcome.transmission = n
            case .disconnect(let reason): outcome.disconnect = reason
            case .startTLS: outcome.startTLS += 1
            }
        }
        outcome.rest = self.array(pending)
        return outcome
    }

    static func run(_ input: [UInt8], resolver: TableResolver = table(), chunk: Int = 0) -> (Outcome, Machine) {
        var machine = self.started(resolver)
        let outcome = self.feed(&machine, input, chunk: chunk)
        return (outcome, machine)
    }

    struct OptionReply: Equatable, CustomStringConvertible {
        var option: UInt32
        var type: UInt32
        var payload: [UInt8]
        var text: String { String(decoding: self.payload, as: UTF8.self) }
        var description: String { "reply(option \(self.option), type 0x\(String(self.type, radix: 16)), \(self.payload.count) bytes)" }
    }

    /// Splits option replies; nil when the bytes are not a whole number of well-formed replies.
    static func parseReplies(_ bytes: [UInt8]) -> [OptionReply]? {
        var b = ByteBuffer(bytes: bytes)
        var out: [OptionReply] = []
        while b.readableBytes > 0 {
            guard let magic = b.readInteger(as: UInt64.self), magic == NBD.replyMagic,
                  let option = b.readInteger(as: UInt32.self), let type = b.readInteger(as: UInt32.self),
                  let length = b.readInteger(as: UInt32.self), let payload = b.readBytes(length: Int(length))
            else { return nil }
            out.append(OptionReply(option: option, type: type, payload: payload))
        }
        return out
    }

    static func request(_ command: NBD.Command, flags: NBD.CommandFlags = [], cookie: UInt64 = 1, offset: UInt64 = 0, length: UInt32 = 0) -> NBDRequest {
        NBDRequest(flags: flags.rawValue, type: command.rawValue, cookie: cookie, offset: offset, length: length)
    }

    static func requestBytes(_ r: NBDRequest, payload: [UInt8] = []) -> [UInt8] {
        var b = ByteBuffer()
        r.write(to: &b)
        return self.array(b) + payload
    }

    /// A negotiated export, obtained the honest way: through the handshake.
    static func negotiate(_ export: NBDExportInfo, structured: Bool, baseAllocation: Bool) throws -> NBDNegotiated {
        var input = self.clientFlags(3)
        if structured { input += self.option(.structuredReply) }
        if baseAllocation { input += self.option(.setMetaContext, self.metaData(export.name, [NBD.baseAllocation])) }
        input += self.option(.go, self.infoData(export.name, [.blockSize]))
        let (outcome, _) = self.run(input, resolver: TableResolver([export]))
        let negotiated = try #require(outcome.transmission)
        #expect(negotiated.export == export)
        #expect(negotiated.structuredReplies == structured)
        #expect(negotiated.baseAllocation == baseAllocation)
        return negotiated
    }
}

// MARK: - Handshake

extension NBDProtocolTests {
    @Suite struct Handshake {
        typealias T = NBDProtocolTests

        @Test func greetingIsNBDMagicIHaveOptAndFixedNewstyleNoZeroes() {
            var machine = Machine(resolver: T.table())
            let greeting = T.array(machine.greeting())
            let expected: [UInt8] = [0x4e, 0x42, 0x44, 0x4d, 0x41, 0x47, 0x49, 0x43,  // NBDMAGIC
                                     0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54,  // IHAVEOPT
                                     0x00, 0x03]
            #expect(greeting == expected)
            #expect(greeting.count == 18)
        }

        @Test func bytesBeforeTheGreetingAreRefused() {
            var machine = Machine(resolver: T.table())
            var input = ByteBuffer(bytes: T.clientFlags(3))
            let actions = machine.receive(&input)
            #expect(actions.count == 1)
            guard case .disconnect(let reason)? = actions.first else {
                Issue.record("expected a disconnect, got \(actions)")
                return
            }
            #expect(reason.contains("before the greeting"))
        }

        @Test(arguments: [UInt32(0x4), 0x8, 0x7, 0x8000_0000, 0xffff_fffc])
        func unknownClientFlagsDisconnectNamingThem(flags: UInt32) {
            let (outcome, machine) = T.run(T.clientFlags(flags) + T.option(.list))
            var m = machine
            let reason = outcome.disconnect
            #expect(outcome.actions.count == 1, "only the disconnect, no reply to the option after it")
            #expect(reason?.contains("unknown client flags") == true)
            #expect(reason?.contains("0x" + String(flags, radix: 16)) == true, "\(reason ?? "")")
            #expect(outcome.rest.count == 16, "the option after the flags is not read")
            #expect(m.endOfInput() == nil, "the handshake is over")
        }

        @Test(arguments: [UInt32(0), 1])
        func knownClientFlagsWithoutNoZeroesAreAccepted(flags: UInt32) {
            let (outcome, _) = T.run(T.clientFlags(flags) + T.option(.structuredReply))
            #expect(outcome.disconnect == nil)
            #expect(outcome.sent == T.reply(.structuredReply, .ack))
        }

        @Test(arguments: [false, true])
        func exportNameRepliesWithSizeFlagsAndZeroesUnlessNoZeroes(noZeroes: Bool) throws {
            let input = T.clientFlags(noZeroes ? 3 : 1) + T.option(.exportName, Array("disk".utf8)) + [0xaa, 0xbb]
            let (outcome, machine) = T.run(input)
            var expected = Wire().u64(1 << 20).u16(T.disk.flags.rawValue).bytes
            #expect(expected == [0, 0, 0, 0, 0, 0x10, 0, 0, 0x04, 0x6d])
            if !noZeroes { expected += [UInt8](repeating: 0, count: 124) }
            #expect(outcome.sent == expected)
            #expect(outcome.sent.count == (noZeroes ? 10 : 134))
            let negotiated = try #require(outcome.transmission)
            #expect(negotiated.export == T.disk)
            #expect(!negotiated.structuredReplies && !negotiated.baseAllocation)
            #expect(outcome.afterTerminal == 0)
            #expect(outcome.rest == [0xaa, 0xbb], "transmission bytes stay in the buffer")
            #expect(machine.resolver.opened == ["disk"])
        }

        @Test func exportNameOfAnUnknownExportDisconnectsNamingIt() {
            let (outcome, machine) = T.run(T.clientFlags(3) + T.option(.exportName, Array("nope".utf8)))
            #expect(outcome.sent.isEmpty)
            #expect(outcome.transmission == nil)
            let reason = outcome.disconnect ?? ""
            #expect(reason.contains("NBD_OPT_EXPORT_NAME") && reason.contains("nope"), "\(reason)")
            #expect(machine.resolver.opened.isEmpty)
        }

        @Test func badOptionMagicDisconnects() {
            let bad = Wire().u64(0x1122_3344_5566_7788).u32(NBD.Option.list.rawValue).u32(0).bytes
            let (outcome, _) = T.run(T.clientFlags(3) + T.option(.structuredReply) + bad)
            #expect(outcome.sent == T.reply(.structuredReply, .ack), "the good option before it is answered")
            let reason = outcome.disconnect ?? ""
            #expect(reason.contains("bad option magic") && reason.contains("1122334455667788"), "\(reason)")
            #expect(outcome.actions.count == 2)
        }

        @Test func optionLongerThan64KiBDisconnectsWithoutWaitingForItsData() {
            let header = Wire(T.optionMagic).u32(NBD.Option.go.rawValue).u32(64 * 1024 + 1).bytes
            let (outcome, _) = T.run(T.clientFlags(3) + header)
            let reason = outcome.disconnect ?? ""
            #expect(reason.contains("65537"), "\(reason)")
            #expect(outcome.sent.isEmpty)
        }

        @Test func optionOfExactly64KiBIsReadAndAnswered() {
            let data = [UInt8](repeating: 0x41, count: 64 * 1024)
            let (outcome, _) = T.run(T.clientFlags(3) + T.option(0x4242, data) + T.option(.structuredReply))
            #expect(outcome.disconnect == nil)
            let replies = T.parseReplies(outcome.sent)
            #expect(replies?.map(\.type) == [NBD.Reply.errUnsupported.rawValue, NBD.Reply.ack.rawValue])
            #expect(replies?.first?.option == 0x4242)
        }

        @Test func moreThan256OptionsDisconnect() {
            var input = T.clientFlags(3)
            for _ in 0..<257 { input += T.option(0x99) }
            input += T.option(.structuredReply)
            let (outcome, _) = T.run(input)
            let replies = T.parseReplies(outcome.sent)
            #expect(replies?.count == 256, "the first 256 options are answered")
            #expect(replies?.allSatisfy { $0.type == NBD.Reply.errUnsupported.rawValue } == true)
            let reason = outcome.disconnect ?? ""
            #expect(reason.contains("more than 256 options"), "\(reason)")
            #expect(outcome.rest == T.option(.structuredReply))
        }

        @Test func exactly256OptionsAreFine() {
            var input = T.clientFlags(3)
            for _ in 0..<255 { input += T.option(0x99) }
            input += T.option(.go, T.infoData("disk", [.blockSize]))
            let (outcome, _) = T.run(input)
            #expect(outcome.disconnect == nil)
            #expect(outcome.transmission != nil)
        }

        /// A long conversation fed at once, in odd chunks and byte by byte gives the same bytes
        /// out, the same result and the same leftover.
        @Test(arguments: [1, 2, 3, 7, 16, 17, 100])
        func chunkingDoesNotChangeTheResult(chunk: Int) throws {
            var input = T.clientFlags(3)
            input += T.option(.list)
            input += T.option(0x77, [1, 2, 3])
            input += T.option(.info, T.infoData("nope"))
            input += T.option(.structuredReply)
            input += T.option(.listMetaContext, T.metaData("disk", []))
            input += T.option(.setMetaContext, T.metaData("disk", [NBD.baseAllocation]))
            input += T.option(.info, T.infoData("disk", [.name, .description, .blockSize]))
            input += T.option(.go, T.infoData("disk", [.blockSize]))
            let trailing = T.requestBytes(T.request(.read, offset: 0, length: 512))
            input += trailing
            let (whole, wholeMachine) = T.run(input)
            let (pieces, piecesMachine) = T.run(input, chunk: chunk)
            let negotiated = try #require(whole.transmission)
            #expect(negotiated.structuredReplies && negotiated.baseAllocation)
            #expect(pieces.transmission == negotiated)
            #expect(pieces.sent == whole.sent)
            #expect(pieces.disconnect == nil && whole.disconnect == nil)
            #expect(whole.rest == trailing)
            #expect(pieces.rest == trailing)
            #expect(pieces.afterTerminal == 0 && whole.afterTerminal == 0)
            #expect(wholeMachine.resolver.opened == ["disk"])
            #expect(piecesMachine.resolver.opened == ["disk"])
            let types = try #require(T.parseReplies(whole.sent)).map(\.type)
            #expect(types.count == 19)
        }

        @Test func partialOptionConsumesNothing() {
            var machine = T.started()
            let full = T.clientFlags(3) + T.option(.go, T.infoData("disk"))
            for cut in 0..<full.count {
                var m = machine
                var buffer = ByteBuffer(bytes: full[..<cut])
                let actions = m.receive(&buffer)
                #expect(actions.isEmpty, "cut at \(cut)")
                // The flags are taken as soon as they are whole; an option only when whole.
                #expect(buffer.readableBytes == (cut >= 4 ? cut - 4 : cut), "cut at \(cut)")
            }
            var buffer = ByteBuffer(bytes: full)
            #expect(machine.receive(&buffer).count == 2)
        }

        @Test func listRepliesWithEveryExportThenAck() throws {
            let (outcome, _) = T.run(T.clientFlags(3) + T.option(.list))
            let server = NBD.Reply.server.rawValue
            let expected = T.reply(3, server, Wire().u32(4).string("disk").string("main disk").bytes)
                + T.reply(3, server, Wire().u32(2).string("ro").bytes)
                + T.reply(3, server, Wire().u32(7).string("aligned").bytes)
                + T.reply(3, 1)
            #expect(outcome.sent == expected)
            // The first reply byte for byte, without the helpers.
            let first: [UInt8] = [0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 3, 0, 0, 0, 2, 0, 0, 0, 17,
                                  0, 0, 0, 4] + Array("diskmain disk".utf8)
            #expect(Array(outcome.sent.prefix(first.count)) == first)
            #expect(outcome.disconnect == nil && outcome.transmission == nil)
        }

        @Test func listWithDataIsInvalidAndTheHandshakeGoesOn() {
            let (outcome, _) = T.run(T.clientFlags(3) + T.option(.list, [0]) + T.option(.structuredReply))
            let replies = T.parseReplies(outcome.sent) ?? []
            #expect(replies.map(\.type) == [NBD.Reply.errInvalid.rawValue, NBD.Reply.ack.rawValue])
            #expect(replies.first?.option == NBD.Option.list.rawValue)
            #expect(replies.first?.text.isEmpty == false)
        }

        @Test func abortIsAcknowledgedThenDisconnects() {
            let (outcome, machine) = T.run(T.clientFlags(3) + T.option(.abort) + T.option(.list))
            #expect(outcome.actions.count == 2)
            #expect(outcome.actions.first == .send(ByteBuffer(bytes: T.reply(.abort, .ack))))
            #expect(outcome.disconnect?.contains("abort") == true)
            #expect(outcome.rest == T.option(.list), "nothing after NBD_OPT_ABORT is read")
            var m = machine
            #expect(m.endOfInput() == nil)
        }

        @Test(arguments: [UInt32(0x1234), NBD.Option.peekExport.rawValue, NBD.Option.extendedHeaders.rawValue, 0xffff_ffff])
        func unknownOptionIsUnsupportedAndTheHandshakeGoesOn(code: UInt32) throws {
            let (outcome, _) = T.run(T.clientFlags(3) + T.option(code, [9, 9]) + T.option(.go, T.infoData("disk", [.blockSize])))
            let replies = try #require(T.parseReplies(outcome.sent))
            #expect(replies.first?.option == code)
            #expect(replies.first?.type == NBD.Reply.errUnsupported.rawValue)
            #expect(outcome.transmission != nil)
        }

        @Test func startTLSIsUnsupportedAndWithDataInvalid() {
            let (plain, _) = T.run(T.clientFlags(3) + T.option(.startTLS))
            let plainReplies = T.parseReplies(plain.sent) ?? []
            #expect(plainReplies.map(\.type) == [NBD.Reply.errUnsupported.rawValue])
            #expect(plainReplies.first?.option == NBD.Option.startTLS.rawValue)
            #expect(plain.disconnect == nil)
            let (withData, _) = T.run(T.clientFlags(3) + T.option(.startTLS, [1]))
            #expect(T.parseReplies(withData.sent)?.map(\.type) == [NBD.Reply.errInvalid.rawValue])
            #expect(withData.disconnect == nil)
        }

        @Test func startTLSIsAcknowledgedThenNothingIsReadUntilTLSRuns() {
            var machine = T.started()
            machine.tls = .on
            let first = T.feed(&machine, T.clientFlags(3) + T.option(.startTLS))
            #expect(T.parseReplies(first.sent)?.map(\.type) == [NBD.Reply.ack.rawValue])
            #expect(first.startTLS == 1)
            #expect(machine.tlsActive)
            // Until the driver has TLS running, nothing more is parsed.
            let early = T.feed(&machine, T.option(.list))
            #expect(early.sent.isEmpty && early.disconnect == nil)
            #expect(early.rest == T.option(.list), "the bytes after STARTTLS wait for TLS")
            machine.tlsStarted()
            let after = T.feed(&machine, T.option(.startTLS) + T.option(.list))
            let replies = T.parseReplies(after.sent) ?? []
            #expect(replies.first?.type == NBD.Reply.errInvalid.rawValue, "STARTTLS twice")
            #expect(replies.last?.type == NBD.Reply.ack.rawValue, "LIST inside TLS")
            #expect(after.startTLS == 0)
        }

        /// Bytes in the clear right behind STARTTLS, in the same read, would be parsed as if
        /// TLS protected them once it runs (the plaintext injection of CVE-2021-3716):
        /// the connection ends instead, with nothing acknowledged and nothing opened.
        @Test func bytesSentInTheClearBehindStartTLSEndTheHandshake() {
            for policy in [NBDTLSPolicy.on, .require] {
                // 0: all in one read; 10: STARTTLS ends a read, GO comes in the next ones.
                for chunk in [0, 10] {
                    var machine = T.started()
                    machine.tls = policy
                    let outcome = T.feed(&machine, T.clientFlags(3) + T.option(.startTLS) + T.option(.go, T.infoData("disk")), chunk: chunk)
                    if chunk == 0 {
                        #expect(outcome.disconnect?.contains("after NBD_OPT_STARTTLS without waiting") == true, "\(policy)")
                        #expect(outcome.sent.isEmpty && outcome.startTLS == 0, "\(policy): not acknowledged")
                        #expect(!machine.tlsActive)
                    } else {
                        // In later reads they wait here; the server passes such reads
                        // through TLS, which refuses clear text as records.
                        #expect(outcome.startTLS == 1 && outcome.disconnect == nil, "\(policy)")
                    }
                    #expect(outcome.transmission == nil && machine.resolver.opened.isEmpty, "\(policy)")
                }
            }
            // STARTTLS with data is refused (no TLS starts): what follows is read on.
            var withData = T.started()
            withData.tls = .on
            let refused = T.feed(&withData, T.clientFlags(3) + T.option(.startTLS, [1]) + T.option(.list))
            #expect(refused.disconnect == nil && refused.startTLS == 0)
            #expect(T.parseReplies(refused.sent)?.map(\.type) == [NBD.Reply.errInvalid.rawValue, NBD.Reply.server.rawValue, NBD.Reply.server.rawValue, NBD.Reply.server.rawValue, NBD.Reply.ack.rawValue])
            // Without TLS on offer, STARTTLS is refused and the options go on.
            let (plain, _) = T.run(T.clientFlags(3) + T.option(.startTLS) + T.option(.list))
            #expect(plain.disconnect == nil)
            #expect(T.parseReplies(plain.sent)?.first?.type == NBD.Reply.errUnsupported.rawValue)
        }

        /// The NBD document: the server operates in NOTLS mode unless the client answered the
        /// greeting with NBD_FLAG_C_FIXED_NEWSTYLE. Offered, STARTTLS is then refused as with
        /// no TLS at all; required, the client cannot be served (it was handled as any other).
        @Test func aClientWithoutFixedNewstyleGetsNoTLS() {
            var offered = T.started()
            offered.tls = .on
            let plain = T.feed(&offered, T.clientFlags(2) + T.option(.startTLS) + T.option(.list))
            #expect(plain.startTLS == 0 && plain.disconnect == nil && !offered.tlsActive)
            #expect(T.parseReplies(plain.sent)?.first?.type == NBD.Reply.errUnsupported.rawValue)
            var required = T.started()
            required.tls = .require
            let refused = T.feed(&required, T.clientFlags(0) + T.option(.startTLS))
            #expect(refused.disconnect?.contains("NBD_FLAG_C_FIXED_NEWSTYLE") == true, "\(String(describing: refused.disconnect))")
            #expect(refused.sent.isEmpty && refused.startTLS == 0)
        }

        @Test func aServerRequiringTLSRefusesOptionsBeforeIt() {
            var machine = T.started()
            machine.tls = .require
            let before = T.feed(&machine, T.clientFlags(3) + T.option(.list) + T.option(.go, T.infoData("disk")) + T.option(.structuredReply))
            #expect(T.parseReplies(before.sent)?.map(\.type) == Array(repeating: NBD.Reply.errTLSRequired.rawValue, count: 3))
            #expect(before.transmission == nil && before.disconnect == nil)
            var exportName = T.started()
            exportName.tls = .require
            let refused = T.feed(&exportName, T.clientFlags(3) + T.option(.exportName, Array("disk".utf8)))
            #expect(refused.disconnect?.contains("before STARTTLS") == true)
            #expect(exportName.resolver.opened.isEmpty, "nothing was opened")
            var aborting = T.started()
            aborting.tls = .require
            #expect(T.feed(&aborting, T.clientFlags(3) + T.option(.abort)).disconnect?.contains("aborted") == true)
            // Once TLS runs, everything is allowed.
            var secured = T.started()
            secured.tls = .require
            _ = T.feed(&secured, T.clientFlags(3) + T.option(.startTLS))
            secured.tlsStarted()
            #expect(T.feed(&secured, T.option(.go, T.infoData("disk"))).transmission != nil)
        }

        @Test func infoOfAnUnknownExportIsErrUnknownWithTheMessage() {
            let (outcome, machine) = T.run(T.clientFlags(3) + T.option(.info, T.infoData("missing")))
            let expected = T.reply(.info, .errUnknown, Array("no export named \"missing\"".utf8))
            #expect(outcome.sent == expected)
            #expect(outcome.disconnect == nil && outcome.transmission == nil)
            #expect(machine.resolver.opened.isEmpty)
        }

        @Test func goRefusedByTheResolverCarriesItsReplyAndMessage() {
            let resolver = TableResolver([T.disk], refusals: ["disk": NBDRefusal(.errPolicy, "busy elsewhere")])
            let (outcome, _) = T.run(T.clientFlags(3) + T.option(.go, T.infoData("disk", [.blockSize])), resolver: resolver)
            #expect(outcome.sent == T.reply(.go, .errPolicy, Array("busy elsewhere".utf8)))
            #expect(outcome.transmission == nil && outcome.disconnect == nil)
        }

        static let malformed: [(String, [UInt8])] = [
            ("empty", []),
            ("truncated length", [0, 0, 0]),
            ("truncated name", Wire().u32(10).string("abc").bytes),
            ("name but no count", Wire().u32(4).string("disk").bytes),
            ("half a count", Wire().u32(4).string("disk").u8(0).bytes),
            ("count 2, one request", Wire().u32(4).string("disk").u16(2).u16(3).bytes),
            ("count 1, none", Wire().u32(4).string("disk").u16(1).bytes),
            ("count 0, trailing byte", Wire().u32(4).string("disk").u16(0).u8(7).bytes),
            ("count 1, odd trailing byte", Wire().u32(4).string("disk").u16(1).u16(3).u8(0).bytes),
            ("name longer than 4096", Wire().u32(4097).raw([UInt8](repeating: 0x61, count: 4097)).u16(0).bytes),
            ("name length 0xffffffff", Wire().u32(0xffff_ffff).u16(0).bytes),
        ]

        @Test(arguments: [NBD.Option.info, .go], 0..<NBDProtocolTests.Handshake.malformed.count)
        func malformedInfoAndGoAreInvalid(option: NBD.Option, index: Int) {
            let (label, data) = Self.malformed[index]
            let (outcome, machine) = T.run(T.clientFlags(3) + T.option(option, data))
            let replies = T.parseReplies(outcome.sent) ?? []
            #expect(replies.count == 1, "\(label)")
            #expect(replies.first?.option == option.rawValue, "\(label)")
            #expect(replies.first?.type == NBD.Reply.errInvalid.rawValue, "\(label)")
            #expect(outcome.transmission == nil && outcome.disconnect == nil, "\(label)")
            #expect(machine.resolver.opened.isEmpty, "\(label)")
        }

        @Test func goSendsExportInfoBlockSizesAckThenEntersTransmission() throws {
            let trailing = T.requestBytes(T.request(.flush, cookie: 5))
            let (outcome, machine) = T.run(T.clientFlags(3) + T.option(.go, T.infoData("disk", [.blockSize])) + trailing)
            let go = NBD.Option.go.rawValue, info = NBD.Reply.info.rawValue
            let expected = T.reply(go, info, Wire().u16(0).u64(1 << 20).u16(T.disk.flags.rawValue).bytes)
                + T.reply(go, info, Wire().u16(3).u32(1).u32(4096).u32(64 << 10).bytes)
                + T.reply(go, 1)
            #expect(outcome.sent == expected)
            // NBD_INFO_EXPORT byte for byte.
            let export: [UInt8] = [0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 12,
                                   0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0x04, 0x6d]
            #expect(Array(outcome.sent.prefix(export.count)) == export)
            #expect(outcome.actions.count == 2)
            guard case .transmission(let negotiated)? = outcome.actions.last else {
                Issue.record("the last action is not .transmission: \(outcome.actions)")
                return
            }
            #expect(negotiated.export == T.disk)
            #expect(!negotiated.structuredReplies)
            #expect(!negotiated.baseAllocation)
            #expect(outcome.rest == trailing, "bytes after NBD_OPT_GO stay in the buffer")
            #expect(machine.resolver.opened == ["disk"])
            var m = machine
            #expect(m.endOfInput() == nil)
            var more = ByteBuffer(bytes: T.option(.list))
            #expect(m.receive(&more).isEmpty, "nothing more is read once in transmission")
            #expect(more.readableBytes == 16)
        }

        @Test func goWithNameAndDescriptionRequested() throws {
            let (outcome, _) = T.run(T.clientFlags(3) + T.option(.go, T.infoData("disk", [.name, .description, .blockSize])))
            let replies = try #require(T.parseReplies(outcome.sent))
            #expect(replies.count == 5)
            #expect(replies.map(\.type) == [3, 3, 3, 3, 1])
            #expect(replies[1].payload == Wire().u16(1).string("disk").bytes)
            #expect(replies[2].payload == Wire().u16(2).string("main disk").bytes)
            #expect(replies[3].payload.prefix(2) == [0, 3])
            #expect(outcome.transmission?.export == T.disk)

            // No description: none is sent even when asked.
            let (noDescription, _) = T.run(T.clientFlags(3) + T.option(.info, T.infoData("ro", [.description, .name])))
            let r2 = try #require(T.parseReplies(noDescription.sent))
            #expect(r2.map(\.type) == [3, 3, 3, 1])
            #expect(r2[1].payload == Wire().u16(1).string("ro").bytes)
            #expect(noDescription.transmission == nil, "NBD_OPT_INFO does not enter transmission")
        }

        @Test func goOnAnAlignedExportWithoutBlockSizeRequestIsServedWithTheSizes() throws {
            // nbd-client sends NBD_OPT_GO with no information request at all: it must get the
            // export (the NBD document: a server SHOULD NOT refuse it), and the sizes anyway.
            let (outcome, machine) = T.run(T.clientFlags(3) + T.option(.go, T.infoData("aligned")))
            let replies = try #require(T.parseReplies(outcome.sent))
            #expect(replies.map(\.type) == [3, 3, 1])
            #expect(!replies.contains { $0.type == NBD.Reply.errBlockSizeRequired.rawValue })
            #expect(replies[1].payload == Wire().u16(3).u32(4096).u32(4096).u32(1 << 20).bytes)
            let negotiated = try #require(outcome.transmission)
            #expect(negotiated.export.minimumBlockSize == 4096)
            #expect(machine.resolver.opened == ["aligned"])

            // NBD_OPT_INFO without the request is fine, and the default-sized export too.
            let (info, _) = T.run(T.clientFlags(3) + T.option(.info, T.infoData("aligned")) + T.option(.go, T.infoData("disk")))
            #expect(T.parseReplies(info.sent)?.map(\.type) == [3, 3, 1, 3, 3, 1])
            #expect(info.transmission?.export == T.disk)
        }

        @Test func structuredReplyOnceThenInvalid() throws {
            let (outcome, _) = T.run(T.clientFlags(3) + T.option(.structuredReply) + T.option(.structuredReply)
                + T.option(.go, T.infoData("disk", [.blockSize])))
            let replies = try #require(T.parseReplies(outcome.sent))
            #expect(Array(replies.prefix(2).map(\.type)) == [NBD.Reply.ack.rawValue, NBD.Reply.errInvalid.rawValue])
            #expect(replies[0].payload.isEmpty)
            #expect(outcome.transmission?.structuredReplies == true)

            let (withData, _) = T.run(T.clientFlags(3) + T.option(.structuredReply, [0, 0])
                + T.option(.go, T.infoData("disk", [.blockSize])))
            let r2 = try #require(T.parseReplies(withData.sent))
            #expect(r2.first?.type == NBD.Reply.errInvalid.rawValue)
            #expect(withData.transmission?.structuredReplies == false, "a refused request negotiates nothing")
        }

        @Test func sendDFIsAdvertisedOnlyOnceStructuredRepliesAreNegotiated() throws {
            let df = NBD.TransmissionFlags.sendDF.rawValue
            #expect(T.disk.flags.rawValue & df == 0, "the resolver does not set it itself")
            // NBD_OPT_GO: the flags are bytes 8-9 of NBD_INFO_EXPORT's payload after its type.
            for structured in [false, true] {
                let (outcome, _) = T.run(T.clientFlags(3) + (structured ? T.option(.structuredReply) : [])
                    + T.option(.go, T.infoData("disk", [.blockSize])))
                let replies = try #require(T.parseReplies(outcome.sent))
                let export = try #require(replies.first { $0.type == NBD.Reply.info.rawValue && $0.payload.prefix(2) == [0, 0] })
                let flags = UInt16(export.payload[10]) << 8 | UInt16(export.payload[11])
                #expect(flags == T.disk.flags.rawValue | (structured ? df : 0), "structured \(structured)")
                #expect(outcome.transmission?.export == T.disk, "transmission keeps the resolver's export")
            }
            // NBD_OPT_EXPORT_NAME after NBD_OPT_STRUCTURED_REPLY: size then flags.
            let (outcome, _) = T.run(T.clientFlags(3) + T.option(.structuredReply) + T.option(.exportName, Array("disk".utf8)))
            let ack = T.reply(.structuredReply, .ack)
            #expect(Array(outcome.sent.prefix(ack.count)) == ack)
            #expect(Array(outcome.sent.dropFirst(ack.count)) == Wire().u64(1 << 20).u16(T.disk.flags.rawValue | df).bytes)
        }

        @Test(arguments: [NBD.Option.setMetaContext, .listMetaContext])
        func metaContextBeforeStructuredRepliesIsInvalid(option: NBD.Option) throws {
            let (outcome, _) = T.run(T.clientFlags(3) + T.option(option, T.metaData("disk", [NBD.baseAllocation]))
                + T.option(.structuredReply) + T.option(.go, T.infoData("disk", [.blockSize])))
            let replies = try #require(T.parseReplies(outcome.sent))
            #expect(replies.first?.type == NBD.Reply.errInvalid.rawValue)
            #expect(replies.first?.option == option.rawValue)
            #expect(outcome.transmission?.structuredReplies == true)
            #expect(outcome.transmission?.baseAllocation == false)
        }

        @Test func listAndSetMetaContextForBaseAllocation() throws {
            let (outcome, _) = T.run(T.clientFlags(3) + T.option(.structuredReply)
                + T.option(.listMetaContext, T.metaData("disk", [NBD.baseAllocation]))
                + T.option(.setMetaContext, T.metaData("disk", [NBD.baseAllocation]))
                + T.option(.go, T.infoData("disk", [.blockSize])))
            let list = NBD.Option.listMetaContext, set = NBD.Option.setMetaContext
            let expected = T.reply(.structuredReply, .ack)
                + T.reply(list, .metaContext, Wire().u32(0).string("base:allocation").bytes) + T.reply(list, .ack)
                + T.reply(set, .metaContext, Wire().u32(1).string("base:allocation").bytes) + T.reply(set, .ack)
            #expect(Array(outcome.sent.prefix(expected.count)) == expected)
            let negotiated = try #require(outcome.transmission)
            #expect(negotiated.structuredReplies && negotiated.baseAllocation)
        }

        @Test func metaContextWithoutQueriesListsAllButSetsNothing() throws {
            let (outcome, _) = T.run(T.clientFlags(3) + T.option(.structuredReply)
                + T.option(.listMetaContext, T.metaData("disk", []))
                + T.option(.setMetaContext, T.metaData("disk", []))
                + T.option(.go, T.infoData("disk", [.blockSize])))
            let replies = try #require(T.parseReplies(outcome.sent))
            #expect(Array(replies.prefix(4).map(\.type)) == [1, 4, 1, 1])
            #expect(outcome.transmission?.baseAllocation == false)
        }

        /// A namespace alone ("base:") lists its contexts, and SET_META_CONTEXT ignores it
        /// (the NBD document: "the server MUST ignore this form" there).
        @Test func aNamespaceAloneListsButDoesNotSet() throws {
            let (outcome, _) = T.run(T.clientFlags(3) + T.option(.structuredReply)
                + T.option(.listMetaContext, T.metaData("disk", ["base:"]))
                + T.option(.setMetaContext, T.metaData("disk", ["base:"]))
                + T.option(.go, T.infoData("disk", [.blockSize])))
            let list = NBD.Option.listMetaContext
            let expected = T.reply(.structuredReply, .ack)
                + T.reply(list, .metaContext, Wire().u32(0).string("base:allocation").bytes) + T.reply(list, .ack)
                + T.reply(.setMetaContext, .ack)
            #expect(Array(outcome.sent.prefix(expected.count)) == expected)
            #expect(outcome.transmission?.baseAllocation == false)
        }

        /// An OFFSET_DATA chunk carries at least one byte: a read of zero bytes is answered
        /// with a final NONE chunk.
        @Test func aZeroLengthReadIsAnsweredWithANoneChunk() {
            var out = ByteBuffer()
            NBDReply.writeReadHeader(cookie: 7, offset: 4096, length: 0, structured: true, into: &out)
            var done = ByteBuffer()
            NBDReply.writeDone(cookie: 7, into: &done)
            #expect(out == done)
            var one = ByteBuffer()
            NBDReply.writeReadHeader(cookie: 7, offset: 4096, length: 1, structured: true, into: &one)
            #expect(one.getInteger(at: 16, as: UInt32.self) == 9 && one.readableBytes == NBDReply.offsetDataHeaderSize)
        }

        @Test func unknownNamespaceIsIgnored() throws {
            let (outcome, _) = T.run(T.clientFlags(3) + T.option(.structuredReply)
                + T.option(.listMetaContext, T.metaData("disk", ["qemu:dirty-bitmap:x"]))
                + T.option(.setMetaContext, T.metaData("disk", ["qemu:dirty-bitmap:x", "other:thing"]))
                + T.option(.go, T.infoData("disk", [.blockSize])))
            let expected = T.reply(.structuredReply, .ack) + T.reply(.listMetaContext, .ack) + T.reply(.setMetaContext, .ack)
            #expect(Array(outcome.sent.prefix(expected.count)) == expected)
            #expect(outcome.transmission?.baseAllocation == false)
        }

        @Test func metaContextProblemsAreAnsweredAndClearTheSelection() throws {
            let unknown = T.metaData("missing", [NBD.baseAllocation])
            let truncated = Array(T.metaData("disk", [NBD.baseAllocation]).dropLast())
            let trailing = T.metaData("disk", [NBD.baseAllocation]) + [0]
            let (outcome, _) = T.run(T.clientFlags(3) + T.option(.structuredReply)
                + T.option(.setMetaContext, T.metaData("disk", [NBD.baseAllocation]))
                + T.option(.setMetaContext, unknown)
                + T.option(.setMetaContext, truncated)
                + T.option(.listMetaContext, trailing)
                + T.option(.go, T.infoData("disk", [.blockSize])))
            let replies = try #require(T.parseReplies(outcome.sent))
            #expect(Array(replies.prefix(6).map(\.type)) == [
                NBD.Reply.ack.rawValue, NBD.Reply.metaContext.rawValue, NBD.Reply.ack.rawValue,
                NBD.Reply.errUnknown.rawValue, NBD.Reply.errInvalid.rawValue, NBD.Reply.errInvalid.rawValue,
            ])
            #expect(outcome.transmission?.baseAllocation == false, "a later failed SET replaces the selection")
        }

        @Test func setForOneExportThenGoToAnother() throws {
            let (outcome, _) = T.run(T.clientFlags(3) + T.option(.structuredReply)
                + T.option(.setMetaContext, T.metaData("ro", [NBD.baseAllocation]))
                + T.option(.go, T.infoData("disk", [.blockSize])))
            let negotiated = try #require(outcome.transmission)
            #expect(negotiated.export.name == "disk")
            #expect(negotiated.structuredReplies)
            #expect(!negotiated.baseAllocation)
        }

        @Test func endOfInputDuringTheHandshakeGivesAReason() {
            var fresh = T.started()
            #expect(fresh.endOfInput()?.contains("during the handshake") == true)
            #expect(fresh.endOfInput() == nil, "only once")

            var (_, midway) = T.run(T.clientFlags(3) + T.option(.structuredReply) + Array(T.option(.list).prefix(9)))
            #expect(midway.endOfInput() != nil)

            var (_, done) = T.run(T.clientFlags(3) + T.option(.go, T.infoData("disk", [.blockSize])))
            #expect(done.endOfInput() == nil, "the handshake had ended")
        }
    }
}

// MARK: - Request decoder

extension NBDProtocolTests {
    @Suite struct RequestDecoder {
        typealias T = NBDProtocolTests

        @Test func parsesTheExact28ByteHeader() throws {
            let header: [UInt8] = [0x25, 0x60, 0x95, 0x13,  // magic
                                   0x00, 0x09,  // flags FUA | REQ_ONE
                                   0x00, 0x07,  // type BLOCK_STATUS
                                   0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08,  // cookie
                                   0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x02, 0x00,  // offset
                                   0x00, 0x01, 0x00, 0x00]  // length
            var buffer = ByteBuffer(bytes: header + [0xee])
            var decoder = NBDRequestDecoder(maximumWritePayload: 1 << 20)
            let item = try decoder.next(&buffer)
            let expected = NBDRequest(flags: 9, type: 7, cookie: 0x0102_0304_0506_0708, offset: 0x1_0000_0200, length: 0x1_0000)
            #expect(item == .request(expected, payload: nil))
            #expect(buffer.readableBytes == 1)
            #expect(expected.command == .blockStatus)
            #expect(expected.commandFlags == [.fua, .reqOne])
            // And NBDRequest.write(to:) produces those bytes.
            #expect(T.requestBytes(expected) == header)
            #expect(try decoder.next(&buffer) == nil)
        }

        @Test func writePayloadIsASliceOfExactlyItsLength() throws {
            let payload: [UInt8] = [1, 2, 3, 4, 5]
            let write = T.request(.write, flags: .fua, cookie: 10, offset: 4096, length: 5)
            let read = T.request(.read, cookie: 11, offset: 0, length: 4096)
            var buffer = ByteBuffer(bytes: T.requestBytes(write, payload: payload) + T.requestBytes(read))
            var decoder = NBDRequestDecoder(maximumWritePayload: 16)
            let first = try #require(try decoder.next(&buffer))
            guard case .request(let r, let p?) = first else {
                Issue.record("expected a write with a payload, got \(first)")
                return
            }
            #expect(r == write)
            #expect(p.readableBytes == 5)
            #expect(T.array(p) == payload)
            #expect(try decoder.next(&buffer) == .request(read, payload: nil))
            #expect(buffer.readableBytes == 0)
            #expect(try decoder.next(&buffer) == nil)
        }

        @Test func writeOfExactlyTheLimitIsNotOversized() throws {
            let write = T.request(.write, cookie: 1, offset: 0, length: 16)
            var buffer = ByteBuffer(bytes: T.requestBytes(write, payload: [UInt8](repeating: 7, count: 16)))
            var decoder = NBDRequestDecoder(maximumWritePayload: 16)
            #expect(try decoder.next(&buffer) == .request(write, payload: ByteBuffer(bytes: [UInt8](repeating: 7, count: 16))))
        }

        @Test func partialInputReturnsNilAndConsumesNothing() throws {
            let bytes = T.requestBytes(T.request(.write, cookie: 3, offset: 8, length: 40), payload: [UInt8](repeating: 0x5a, count: 40))
            var decoder = NBDRequestDecoder(maximumWritePayload: 1024)
            for cut in 0..<bytes.count {
                var buffer = ByteBuffer(bytes: bytes[..<cut])
                #expect(try decoder.next(&buffer) == nil, "cut at \(cut)")
                #expect(buffer.readableBytes == cut, "cut at \(cut)")
                #expect(decoder.skipping == 0)
            }
            var whole = ByteBuffer(bytes: bytes)
            #expect(try decoder.next(&whole) != nil)
        }

        @Test func bytesAwaitedNamesAWriteStillMissingPayload() throws {
            let bytes = T.requestBytes(T.request(.write, cookie: 3, offset: 8, length: 40), payload: [UInt8](repeating: 0x5a, count: 40))
            var decoder = NBDRequestDecoder(maximumWritePayload: 1024)
            for cut in 0..<bytes.count {
                let expected: Int? = cut >= 28 ? 68 : nil
                #expect(decoder.bytesAwaited(in: ByteBuffer(bytes: bytes[..<cut])) == expected, "cut at \(cut)")
            }
            #expect(decoder.bytesAwaited(in: ByteBuffer(bytes: bytes)) == nil)  // complete
            // Not a write, a write above the limit (it is skipped, not kept) and bad magic: nil.
            #expect(decoder.bytesAwaited(in: ByteBuffer(bytes: T.requestBytes(T.request(.read, length: 4096)))) == nil)
            let big = T.requestBytes(T.request(.write, cookie: 4, offset: 0, length: 2048))
            #expect(decoder.bytesAwaited(in: ByteBuffer(bytes: big)) == nil)
            var bad = Array(bytes[..<28])
            bad[0] = 0
            #expect(decoder.bytesAwaited(in: ByteBuffer(bytes: bad)) == nil)
            // While the rest of an oversized write is skipped, nothing is awaited.
            var oversized = ByteBuffer(bytes: big + [1, 2, 3])
            _ = try decoder.next(&oversized)
            #expect(decoder.skipping > 0)
            #expect(decoder.bytesAwaited(in: ByteBuffer(bytes: bytes[..<30])) == nil)
        }

        @Test func bytesMissingNamesWhatTheRequestAtTheFrontLacks() throws {
            let write = T.requestBytes(T.request(.write, cookie: 3, offset: 8, length: 40), payload: [UInt8](repeating: 0x5a, count: 40))
            let read = T.requestBytes(T.request(.read, cookie: 4, offset: 0, length: 4096))
            var decoder = NBDRequestDecoder(maximumWritePayload: 1024)
            for cut in 0..<write.count {
                // The header's rest first (whatever it turns out to be), then the payload's.
                let expected = cut < 28 ? 28 - cut : 68 - cut
                #expect(decoder.bytesMissing(in: ByteBuffer(bytes: write[..<cut])) == expected, "write cut at \(cut)")
                #expect(decoder.bytesMissing(in: ByteBuffer(bytes: read[..<min(cut, 28)])) == 28 - min(cut, 28), "read cut at \(cut)")
            }
            // Complete, with or without more behind it: nothing missing.
            #expect(decoder.bytesMissing(in: ByteBuffer(bytes: write)) == 0)
            #expect(decoder.bytesMissing(in: ByteBuffer(bytes: write + read[..<5])) == 0)
            #expect(decoder.bytesMissing(in: ByteBuffer(bytes: read)) == 0)
            // A write above the limit is taken at its header (its payload is skipped), and bad
            // magic is for `next` to report: nothing missing.
            let big = T.requestBytes(T.request(.write, cookie: 5, offset: 0, length: 2048))
            #expect(decoder.bytesMissing(in: ByteBuffer(bytes: big)) == 0)
            var bad = Array(write[..<30])
            bad[0] = 0
            #expect(decoder.bytesMissing(in: ByteBuffer(bytes: bad)) == 0)
            // While an oversized write's payload is skipped: nil.
            var oversized = ByteBuffer(bytes: big + [1, 2, 3])
            _ = try decoder.next(&oversized)
            #expect(decoder.skipping > 0)
            #expect(decoder.bytesMissing(in: ByteBuffer(bytes: write[..<30])) == nil)
        }

        @Test func takeLargeWriteTakesOnlyTheHeaderOfAnIncompleteLargeWrite() throws {
            let write = T.request(.write, flags: .fua, cookie: 9, offset: 4096, length: 300)
            let bytes = T.requestBytes(write, payload: [UInt8](repeating: 1, count: 300))
            var decoder = NBDRequestDecoder(maximumWritePayload: 1024)
            var partial = ByteBuffer(bytes: bytes[..<100])
            #expect(decoder.takeLargeWrite(&partial, minimum: 301) == nil, "smaller than the minimum")
            #expect(partial.readableBytes == 100)
            #expect(decoder.takeLargeWrite(&partial, minimum: 300) == write)
            #expect(partial.readableBytes == 72, "left at the payload's first byte")
            var whole = ByteBuffer(bytes: bytes)
            #expect(decoder.takeLargeWrite(&whole, minimum: 1) == nil, "complete: next() takes it")
            var header = ByteBuffer(bytes: bytes[..<27])
            #expect(decoder.takeLargeWrite(&header, minimum: 1) == nil)
            var read = ByteBuffer(bytes: T.requestBytes(T.request(.read, length: 4096)))
            #expect(decoder.takeLargeWrite(&read, minimum: 1) == nil)
        }

        @Test func badMagicThrowsNamingTheMagic() throws {
            var bytes = T.requestBytes(T.request(.read, length: 1))
            bytes[0] = 0xde; bytes[1] = 0xad; bytes[2] = 0xbe; bytes[3] = 0xef
            var buffer = ByteBuffer(bytes: bytes)
            var decoder = NBDRequestDecoder(maximumWritePayload: 1024)
            do throws(NBDRequestDecoder.BadMagic) {
                _ = try decoder.next(&buffer)
                Issue.record("no error thrown")
            } catch {
                #expect(error.magic == 0xdead_beef)
                #expect(error.description.contains("0xdeadbeef"), "\(error.description)")
            }
            #expect(buffer.readableBytes == 28, "nothing consumed")
            // A bad magic is only seen once the header is whole.
            var short = ByteBuffer(bytes: bytes.prefix(27))
            #expect(try decoder.next(&short) == nil)
        }

        @Test func oversizedWriteIsReportedAndItsPayloadSkippedAcrossCalls() throws {
            var decoder = NBDRequestDecoder(maximumWritePayload: 1024)
            let big = T.request(.write, cookie: 77, offset: 0, length: 5000)
            let next = T.request(.trim, cookie: 78, offset: 512, length: 512)
            let payload = (0..<5000).map { UInt8(truncatingIfNeeded: $0) }
            let stream = T.requestBytes(big, payload: payload) + T.requestBytes(next)

            var buffer = ByteBuffer(bytes: stream[0..<(28 + 100)])
            #expect(try decoder.next(&buffer) == .oversizedWrite(big))
            #expect(buffer.readableBytes == 0, "the payload that arrived with the header is skipped")
            #expect(decoder.skipping == 4900)

            buffer.writeBytes(stream[128..<2128])
            #expect(try decoder.next(&buffer) == nil)
            #expect(buffer.readableBytes == 0)
            #expect(decoder.skipping == 2900)

            buffer.writeBytes(stream[2128..<4000])
            #expect(try decoder.next(&buffer) == nil)
            #expect(decoder.skipping == 1028)

            // The rest of the payload, then the next request, partly.
            buffer.writeBytes(stream[4000..<(5028 + 10)])
            #expect(try decoder.next(&buffer) == nil)
            #expect(decoder.skipping == 0)
            #expect(buffer.readableBytes == 10, "the next request's first bytes stay")

            buffer.writeBytes(stream[(5028 + 10)...])
            #expect(try decoder.next(&buffer) == .request(next, payload: nil))
            #expect(buffer.readableBytes == 0)
        }

        @Test func oversizedWriteFollowedInOneBufferByTheNextRequest() throws {
            var decoder = NBDRequestDecoder(maximumWritePayload: 8)
            let big = T.request(.write, cookie: 1, offset: 0, length: 9)
            let next = T.request(.flush, cookie: 2)
            var buffer = ByteBuffer(bytes: T.requestBytes(big, payload: [UInt8](repeating: 0x25, count: 9)) + T.requestBytes(next))
            #expect(try decoder.next(&buffer) == .oversizedWrite(big))
            #expect(try decoder.next(&buffer) == .request(next, payload: nil))
            #expect(decoder.skipping == 0)
        }

        @Test func otherCommandsNeverCarryAPayload() throws {
            var decoder = NBDRequestDecoder(maximumWritePayload: 8)
            for command in [NBD.Command.read, .trim, .writeZeroes, .cache, .blockStatus, .flush, .disconnect] {
                let r = T.request(command, cookie: 9, offset: 0, length: 0xffff_ffff)
                var buffer = ByteBuffer(bytes: T.requestBytes(r))
                #expect(try decoder.next(&buffer) == .request(r, payload: nil), "\(command)")
                #expect(buffer.readableBytes == 0)
            }
        }
    }
}

// MARK: - Validation

extension NBDProtocolTests {
    @Suite struct Validation {
        typealias T = NBDProtocolTests

        static func export(size: UInt64 = 1 << 20, readOnly: Bool = false, minimumBlockSize: UInt32 = 1, maximumPayload: UInt32 = 64 << 10) -> NBDExportInfo {
            var flags: NBD.TransmissionFlags = [.hasFlags, .sendFlush, .sendFUA]
            if readOnly { flags.insert(.readOnly) }
            return NBDExportInfo(name: "v", size: size, flags: flags, minimumBlockSize: minimumBlockSize,
                                 preferredBlockSize: max(4096, minimumBlockSize), maximumPayload: maximumPayload)
        }

        static func expectError(_ result: Result<NBDOperation, NBDRequestError>, _ errno: NBD.Errno, _ fragment: String,
                                sourceLocation: SourceLocation = #_sourceLocation) {
            switch result {
            case .success(let op):
                Issue.record("expected \(errno), got \(op)", sourceLocation: sourceLocation)
            case .failure(let e):
                #expect(e.errno == errno, "\(e.message)", sourceLocation: sourceLocation)
                #expect(e.message.contains(fragment), "\(e.message)", sourceLocation: sourceLocation)
            }
        }

        @Test func unknownCommandAndUnknownFlags() throws {
            let n = try T.negotiate(Self.export(), structured: true, baseAllocation: true)
            Self.expectError(n.validate(NBDRequest(type: 8, cookie: 1, offset: 0, length: 0)), .inval, "unknown command 8")
            Self.expectError(n.validate(NBDRequest(type: 0xffff, cookie: 1, offset: 0, length: 0)), .inval, "unknown command 65535")
            Self.expectError(n.validate(NBDRequest(flags: 1 << 5, type: 0, cookie: 1, offset: 0, length: 1)), .inval, "0x20")
            Self.expectError(n.validate(NBDRequest(flags: 0x8001, type: 3, cookie: 1, offset: 0, length: 0)), .inval, "0x8001")
        }

        @Test func rangeChecks() throws {
            let n = try T.negotiate(Self.export(), structured: true, baseAllocation: true)
            let size: UInt64 = 1 << 20
            for command in [NBD.Command.read, .write, .trim, .writeZeroes, .cache, .blockStatus] {
                // Writes and write-zeroes past the end: ENOSPC, as the NBD document says they SHOULD.
                let past: NBD.Errno = command == .write || command == .writeZeroes ? .nospc : .inval
                Self.expectError(n.validate(T.request(command, offset: size - 512, length: 1024)), past, "past the export")
                Self.expectError(n.validate(T.request(command, offset: size, length: 1)), past, "past the export")
                Self.expectError(n.validate(T.request(command, offset: UInt64.max - 10, length: 100)), past, "past the export")
                Self.expectError(n.validate(T.request(command, offset: UInt64.max, length: 1)), past, "past the export")
                // Up to the very end is fine.
                #expect((try? n.validate(T.request(command, offset: size - 512, length: 512)).get()) != nil, "\(command)")
            }
        }

        @Test func alignmentToTheMinimumBlockSize() throws {
            let n = try T.negotiate(Self.export(minimumBlockSize: 512), structured: true, baseAllocation: true)
            for command in [NBD.Command.read, .write, .trim, .writeZeroes] {
                Self.expectError(n.validate(T.request(command, offset: 100, length: 512)), .inval, "not aligned")
                Self.expectError(n.validate(T.request(command, offset: 512, length: 100)), .inval, "not aligned")
                #expect((try? n.validate(T.request(command, offset: 1024, length: 2048)).get()) != nil, "\(command)")
            }
            // Past the end is reported before misalignment.
            Self.expectError(n.validate(T.request(.read, offset: (1 << 20) - 1, length: 2)), .inval, "past the export")
        }

        @Test func readLargerThanTheMaximumPayloadOverflows() throws {
            let n = try T.negotiate(Self.export(maximumPayload: 65536), structured: false, baseAllocation: false)
            Self.expectError(n.validate(T.request(.read, offset: 0, length: 65537)), .inval, "larger than the maximum 65536")
            #expect(try n.validate(T.request(.read, offset: 0, length: 65536)).get() == .read(offset: 0, length: 65536))
        }

        @Test func writesToAReadOnlyExportAreRefusedWithPerm() throws {
            let n = try T.negotiate(Self.export(readOnly: true), structured: true, baseAllocation: true)
            Self.expectError(n.validate(T.request(.write, offset: 0, length: 512)), .perm, "read-only")
            Self.expectError(n.validate(T.request(.trim, offset: 0, length: 512)), .perm, "read-only")
            Self.expectError(n.validate(T.request(.writeZeroes, offset: 0, length: 512)), .perm, "read-only")
            // Even out of range, the read-only answer comes first.
            Self.expectError(n.validate(T.request(.write, offset: UInt64.max, length: 512)), .perm, "read-only")
            #expect(try n.validate(T.request(.read, offset: 0, length: 512)).get() == .read(offset: 0, length: 512))
            #expect(try n.validate(T.request(.flush)).get() == .flush)
            #expect(try n.validate(T.request(.cache, offset: 0, length: 512)).get() == .cache(offset: 0, length: 512))
            #expect(try n.validate(T.request(.blockStatus, offset: 0, length: 512)).get() == .blockStatus(offset: 0, length: 512, reqOne: false))
        }

        @Test func flagsOnlyAllowedWhereTheyMeanSomething() throws {
            let plain = try T.negotiate(Self.export(), structured: false, baseAllocation: false)
            let structured = try T.negotiate(Self.export(), structured: true, baseAllocation: true)
            Self.expectError(plain.validate(T.request(.read, flags: .dontFragment, length: 512)), .inval, "NBD_CMD_FLAG_DF")
            Self.expectError(structured.validate(T.request(.write, flags: .dontFragment, length: 512)), .inval, "NBD_CMD_FLAG_DF")
            #expect(try structured.validate(T.request(.read, flags: .dontFragment, offset: 0, length: 512)).get() == .read(offset: 0, length: 512))
            for command in [NBD.Command.read, .write, .trim, .writeZeroes, .flush, .cache] {
                Self.expectError(structured.validate(T.request(command, flags: .reqOne, length: 512)), .inval, "REQ_ONE")
            }
            for command in [NBD.Command.read, .write, .trim, .flush, .cache, .blockStatus] {
                Self.expectError(structured.validate(T.request(command, flags: .noHole, length: 512)), .inval, "NO_HOLE")
                Self.expectError(structured.validate(T.request(command, flags: .fastZero, length: 512)), .inval, "FAST_ZERO")
            }
        }

        @Test func blockStatusNeedsBaseAllocationAndALength() throws {
            let without = try T.negotiate(Self.export(), structured: true, baseAllocation: false)
            Self.expectError(without.validate(T.request(.blockStatus, offset: 0, length: 512)), .inval, "metadata context")
            let with = try T.negotiate(Self.export(), structured: true, baseAllocation: true)
            Self.expectError(with.validate(T.request(.blockStatus, offset: 0, length: 0)), .inval, "length 0")
        }

        @Test func successMapsEveryCommand() throws {
            let n = try T.negotiate(Self.export(), structured: true, baseAllocation: true)
            let cases: [(NBDRequest, NBDOperation)] = [
                (T.request(.read, offset: 4096, length: 8192), .read(offset: 4096, length: 8192)),
                (T.request(.read, flags: .fua, offset: 0, length: 1), .read(offset: 0, length: 1)),
                (T.request(.write, offset: 100, length: 7), .write(offset: 100, fua: false)),
                (T.request(.write, flags: .fua, offset: 100, length: 7), .write(offset: 100, fua: true)),
                (T.request(.write, offset: 1 << 20, length: 0), .write(offset: 1 << 20, fua: false)),
                (T.request(.flush), .flush),
                (T.request(.flush, offset: UInt64.max, length: 0xffff_ffff), .flush),
                (T.request(.disconnect), .disconnect),
                (T.request(.trim, offset: 512, length: 1024), .trim(offset: 512, length: 1024, fua: false)),
                (T.request(.trim, flags: .fua, offset: 512, length: 1024), .trim(offset: 512, length: 1024, fua: true)),
                (T.request(.writeZeroes, offset: 0, length: 65536),
                 .writeZeroes(offset: 0, length: 65536, fua: false, noHole: false, fastZero: false)),
                (T.request(.writeZeroes, flags: [.fua, .noHole, .fastZero], offset: 0, length: 65536),
                 .writeZeroes(offset: 0, length: 65536, fua: true, noHole: true, fastZero: true)),
                (T.request(.writeZeroes, flags: .noHole, offset: 8, length: 8),
                 .writeZeroes(offset: 8, length: 8, fua: false, noHole: true, fastZero: false)),
                (T.request(.cache, offset: 3, length: 5), .cache(offset: 3, length: 5)),
                (T.request(.blockStatus, offset: 0, length: 1 << 20), .blockStatus(offset: 0, length: 1 << 20, reqOne: false)),
                (T.request(.blockStatus, flags: .reqOne, offset: 7, length: 9), .blockStatus(offset: 7, length: 9, reqOne: true)),
            ]
            for (request, operation) in cases {
                #expect(n.validate(request) == .success(operation), "\(request)")
            }
        }
    }
}

// MARK: - Reply encoders

extension NBDProtocolTests {
    @Suite struct ReplyEncoding {
        typealias T = NBDProtocolTests
        static let cookie: UInt64 = 0x0102_0304_0506_0708
        static let cookieBytes: [UInt8] = [1, 2, 3, 4, 5, 6, 7, 8]
        static let structuredMagic: [UInt8] = [0x66, 0x8e, 0x33, 0xef]

        @Test func simpleReply() {
            var out = ByteBuffer()
            NBDReply.writeSimple(cookie: Self.cookie, error: .io, into: &out)
            #expect(T.array(out) == [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5] + Self.cookieBytes)
            #expect(out.readableBytes == NBDReply.simpleHeaderSize)
        }

        @Test func doneChunk() {
            var out = ByteBuffer()
            NBDReply.writeDone(cookie: Self.cookie, into: &out)
            let expected: [UInt8] = Self.structuredMagic + [0, 1, 0, 0] + Self.cookieBytes + [0, 0, 0, 0]
            #expect(T.array(out) == expected)
            #expect(out.readableBytes == NBDReply.structuredHeaderSize)
        }

        @Test func errorChunk() {
            var out = ByteBuffer()
            NBDReply.writeError(cookie: Self.cookie, error: .inval, message: "bad", into: &out)
            let header: [UInt8] = Self.structuredMagic + [0, 1, 0x80, 0x01] + Self.cookieBytes + [0, 0, 0, 9]
            let body: [UInt8] = [0, 0, 0, 22, 0, 3, 0x62, 0x61, 0x64]
            #expect(T.array(out) == header + body)
        }

        @Test func errorChunkMessageIsBoundedAndEmptyAllowed() {
            var long = ByteBuffer()
            NBDReply.writeError(cookie: 1, error: .io, message: String(repeating: "x", count: 70_000), into: &long)
            let bytes = T.array(long)
            let limit = Int(UInt16.max / 4)
            #expect(bytes.count == 20 + 6 + limit)
            #expect(Array(bytes[16..<20]) == T.Wire().u32(UInt32(6 + limit)).bytes)
            #expect(Array(bytes[24..<26]) == T.Wire().u16(UInt16(limit)).bytes)

            var empty = ByteBuffer()
            NBDReply.writeError(cookie: 1, error: .nospc, message: "", into: &empty)
            #expect(Array(T.array(empty).suffix(10)) == [0, 0, 0, 6, 0, 0, 0, 28, 0, 0])
        }

        @Test func offsetDataHeader() {
            var out = ByteBuffer()
            NBDReply.writeOffsetDataHeader(cookie: Self.cookie, offset: 0x1000, length: 512, into: &out)
            let expected: [UInt8] = Self.structuredMagic + [0, 1, 0, 1] + Self.cookieBytes + [0, 0, 2, 8]
                + [0, 0, 0, 0, 0, 0, 0x10, 0]
            #expect(T.array(out) == expected)
            #expect(out.readableBytes == NBDReply.offsetDataHeaderSize)
        }

        @Test func blockStatusChunk() {
            var out = ByteBuffer()
            let extents = [BlockExtent(length: 4096, isHole: false), BlockExtent(length: 8192, isHole: true),
                           BlockExtent(length: 512, isHole: false, isZero: true)]
            NBDReply.writeBlockStatus(cookie: Self.cookie, extents: extents, into: &out)
            var expected: [UInt8] = Self.structuredMagic + [0, 1, 0, 5] + Self.cookieBytes + [0, 0, 0, 28]
            expected += [0, 0, 0, 1]  // context id of base:allocation
            expected += [0, 0, 0x10, 0, 0, 0, 0, 0]  // data
            expected += [0, 0, 0x20, 0, 0, 0, 0, 3]  // hole | zero
            expected += [0, 0, 0x02, 0, 0, 0, 0, 2]  // zero
            #expect(T.array(out) == expected)
            #expect(BlockExtent(length: 1, isHole: true).isZero, "a hole always reads as zeroes")
        }

        @Test func replyWithoutDataPicksTheForm() {
            let e = NBDRequestError(.perm, "no")
            var a = ByteBuffer(), b = ByteBuffer(), c = ByteBuffer(), d = ByteBuffer()
            var ea = ByteBuffer(), eb = ByteBuffer(), ec = ByteBuffer(), ed = ByteBuffer()
            NBDReply.write(cookie: 9, result: nil, structured: true, into: &a)
            NBDReply.writeDone(cookie: 9, into: &ea)
            NBDReply.write(cookie: 9, result: nil, structured: false, into: &b)
            NBDReply.writeSimple(cookie: 9, error: .ok, into: &eb)
            NBDReply.write(cookie: 9, result: e, structured: true, into: &c)
            NBDReply.writeError(cookie: 9, error: .perm, message: "no", into: &ec)
            NBDReply.write(cookie: 9, result: e, structured: false, into: &d)
            NBDReply.writeSimple(cookie: 9, error: .perm, into: &ed)
            #expect(a == ea && b == eb && c == ec && d == ed)
            #expect(T.array(d) == [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 9])
        }
    }
}

// MARK: - Random mutations

extension NBDProtocolTests {
    @Suite struct Mutations {
        typealias T = NBDProtocolTests

        /// A client's whole conversation: the handshake, then requests of every kind.
        static let handshake: [UInt8] = T.clientFlags(3) + T.option(.structuredReply)
            + T.option(.setMetaContext, T.metaData("disk", [NBD.baseAllocation]))
            + T.option(.go, T.infoData("disk", [.blockSize]))
        static let requests: [UInt8] = {
            var b: [UInt8] = []
            b += T.requestBytes(T.request(.read, flags: .dontFragment, cookie: 1, offset: 0, length: 4096))
            b += T.requestBytes(T.request(.write, flags: .fua, cookie: 2, offset: 4096, length: 16), payload: [UInt8](repeating: 0xab, count: 16))
            b += T.requestBytes(T.request(.flush, cookie: 3))
            b += T.requestBytes(T.request(.trim, cookie: 4, offset: 8192, length: 4096))
            b += T.requestBytes(T.request(.writeZeroes, flags: [.noHole, .fastZero], cookie: 5, offset: 0, length: 512))
            b += T.requestBytes(T.request(.blockStatus, flags: .reqOne, cookie: 6, offset: 0, length: 1 << 20))
            b += T.requestBytes(T.request(.cache, cookie: 7, offset: 0, length: 65536))
            b += T.requestBytes(T.request(.disconnect, cookie: 8))
            return b
        }()

        enum End: Equatable {
            /// The handshake is still waiting for bytes.
            case handshakeNeedsMore
            case disconnected(String)
            /// In transmission, the decoder waiting for bytes.
            case requestsNeedMore
            case badMagic(UInt32)
        }

        enum Event: Equatable {
            case request(NBDRequest, payload: [UInt8]?, Result<NBDOperation, NBDRequestError>)
            case oversized(NBDRequest)
        }

        struct Trace: Equatable {
            var sent: [UInt8] = []
            var negotiated: NBDNegotiated?
            var events: [Event] = []
            var end: End = .handshakeNeedsMore
            /// Broken invariants (compared too, but mostly reported).
            var violations: [String] = []
        }

        /// Runs `input` through a fresh state machine, then the decoder and validation, fed in
        /// pieces of the given sizes (cycled); checks every invariant on the way.
        static func drive(_ input: [UInt8], pieces: [Int]) -> Trace {
            var trace = Trace()
            var machine = T.started()
            var pending = ByteBuffer()
            var decoder: NBDRequestDecoder?
            var at = 0, piece = 0, steps = 0, feeds = 0
            func fail(_ s: String) { trace.violations.append(s) }

            while true {
                let n = min(pieces[piece % pieces.count], input.count - at)
                piece += 1
                pending.writeBytes(input[at..<(at + n)])
                at += n
                feeds += 1
                // Every call makes progress or asks for more: a bound on the calls.
                let stepLimit = input.count / NBD.requestHeaderSize + 2 * feeds + 4

                if trace.negotiated == nil {
                    let before = pending.readableBytes
                    let actions = machine.receive(&pending)
                    steps += 1
                    if pending.readableBytes > before { fail("the handshake grew the buffer") }
                    for (i, action) in actions.enumerated() {
                        let last = i == actions.count - 1
                        switch action {
                        case .send(let b):
                            trace.sent += T.array(b)
                        case .disconnect(let reason):
                            if !last { fail("actions after a disconnect") }
                            if reason.isEmpty { fail("empty disconnect reason") }
                            trace.end = .disconnected(reason)
                            // Terminal: nothing more is read or answered.
                            var again = ByteBuffer(bytes: input[at...])
                            if !machine.receive(&again).isEmpty || again.readableBytes != input.count - at {
                                fail("the machine acted after a disconnect")
                            }
                            if machine.endOfInput() != nil { fail("endOfInput after a disconnect gave a reason") }
                            Self.checkReplies(trace.sent, fail)
                            return trace
                        case .startTLS:
                            fail("STARTTLS acknowledged by a server without TLS")
                        case .transmission(let negotiated):
                            if !last { fail("actions after entering transmission") }
                            trace.negotiated = negotiated
                            decoder = NBDRequestDecoder(maximumWritePayload: negotiated.export.maximumPayload)
                            if negotiated.export != T.disk && negotiated.export != T.readOnly && negotiated.export != T.aligned {
                                fail("negotiated an export not in the table")
                            }
                            if negotiated.baseAllocation && !negotiated.structuredReplies { fail("base:allocation without structured replies") }
                            if machine.resolver.opened.count != 1 { fail("\(machine.resolver.opened.count) opens for one transmission") }
                        }
                    }
                    if trace.negotiated == nil, machine.resolver.opened.count != 0 { fail("an open without transmission") }
                }

                if let negotiated = trace.negotiated {
                    trace.end = .requestsNeedMore
                    decoding: while true {
                        steps += 1
                        if steps > stepLimit {
                            fail("more than \(stepLimit) steps")
                            return trace
                        }
                        let before = pending.readerIndex
                        let item: NBDRequestDecoder.Item?
                        do throws(NBDRequestDecoder.BadMagic) {
                            item = try decoder!.next(&pending)
                        } catch {
                            let magic = pending.getInteger(at: pending.readerIndex, as: UInt32.self)
                            if magic != error.magic || error.magic == NBD.requestMagic { fail("BadMagic names the wrong magic") }
                            trace.end = .badMagic(error.magic)
                            Self.checkReplies(trace.sent, fail)
                            return trace
                        }
                        guard let item else {
                            // Needs more: a second call changes nothing.
                            let index = pending.readerIndex
                            if (try? decoder!.next(&pending)) != nil || pending.readerIndex != index {
                                fail("nil was not a stable 'needs more bytes'")
                            }
                            if decoder!.skipping == 0, pending.readableBytes >= NBD.requestHeaderSize {
                                let length = pending.getInteger(at: pending.readerIndex + 24, as: UInt32.self)!
                                let type = pending.getInteger(at: pending.readerIndex + 6, as: UInt16.self)!
                                if type != NBD.Command.write.rawValue || pending.readableBytes >= NBD.requestHeaderSize + Int(length) {
                                    fail("nil with a whole request in the buffer")
                                }
                            }
                            break decoding
                        }
                        if pending.readerIndex - before < NBD.requestHeaderSize { fail("a request consumed fewer than 28 bytes") }
                        switch item {
                        case .oversizedWrite(let r):
                            if r.length <= negotiated.export.maximumPayload || r.type != NBD.Command.write.rawValue { fail("bad oversized \(r)") }
                            trace.events.append(.oversized(r))
                        case .request(let r, let payload):
                            let result = negotiated.validate(r)
                            Self.checkValidation(r, payload: payload, result: result, negotiated: negotiated, fail)
                            trace.events.append(.request(r, payload: payload.map(T.array), result))
                        }
                    }
                }
                if at >= input.count { break }
            }
            if trace.negotiated == nil {
                // The handshake waits for more: it does nothing more with what it has...
                var copy = machine
                let index = pending.readerIndex
                if !copy.receive(&pending).isEmpty || pending.readerIndex != index { fail("the waiting handshake acted again") }
                // ...and a close now has a reason.
                if machine.endOfInput() == nil { fail("endOfInput during the handshake gave no reason") }
            }
            Self.checkReplies(trace.sent, fail)
            return trace
        }

        /// What the handshake sent is a whole number of well-formed option replies.
        static func checkReplies(_ sent: [UInt8], _ fail: (String) -> Void) {
            // NBD_OPT_EXPORT_NAME's reply is not an option reply: skip when it ends the handshake.
            if T.parseReplies(sent) == nil, !(sent.count >= 10 && T.parseReplies(Array(sent.dropLast(10))) != nil)
                && !(sent.count >= 134 && T.parseReplies(Array(sent.dropLast(134))) != nil) {
                fail("the handshake sent bytes that are not option replies")
            }
        }

        static func checkValidation(_ r: NBDRequest, payload: ByteBuffer?, result: Result<NBDOperation, NBDRequestError>,
                                    negotiated: NBDNegotiated, _ fail: (String) -> Void) {
            let info = negotiated.export
            if r.type == NBD.Command.write.rawValue {
                if payload?.readableBytes != Int(r.length) { fail("write payload of the wrong length") }
            } else if payload != nil {
                fail("payload on a non-write")
            }
            switch result {
            case .failure(let e):
                if e.message.isEmpty { fail("empty refusal message") }
            case .success(let op):
                if r.flags & ~NBD.CommandFlags.all.rawValue != 0 { fail("unknown flags accepted") }
                func inside(_ offset: UInt64, _ length: UInt32) {
                    let (end, overflow) = offset.addingReportingOverflow(UInt64(length))
                    if overflow || end > info.size { fail("\(op) accepted past the end") }
                }
                let writes: Bool
                switch op {
                case .read(let o, let l):
                    inside(o, l)
                    if l > info.maximumPayload { fail("read over the maximum payload") }
                    writes = false
                case .write(let o, _): inside(o, r.length); writes = true
                case .trim(let o, let l, _): inside(o, l); writes = true
                case .writeZeroes(let o, let l, _, _, _): inside(o, l); writes = true
                case .cache(let o, let l): inside(o, l); writes = false
                case .blockStatus(let o, let l, _):
                    inside(o, l)
                    if l == 0 || !negotiated.baseAllocation { fail("block status accepted") }
                    writes = false
                case .flush, .disconnect: writes = false
                }
                if writes && info.flags.contains(.readOnly) { fail("write accepted on a read-only export") }
            }
        }

        static func mutate(_ input: [UInt8], rng: inout SplitMix) -> [UInt8] {
            var b = input
            let interesting: [UInt8] = [0x00, 0xff, 0x7f, 0x80, 0x01, 0x10, 0x25, 0x49]
            for _ in 0..<Int.random(in: 1...4, using: &rng) {
                switch Int.random(in: 0..<9, using: &rng) {
                case 0, 1, 2:  // flip a bit
                    guard !b.isEmpty else { continue }
                    b[Int.random(in: 0..<b.count, using: &rng)] ^= 1 << UInt8.random(in: 0..<8, using: &rng)
                case 3, 4:  // overwrite a byte
                    guard !b.isEmpty else { continue }
                    let v = Bool.random(using: &rng) ? interesting.randomElement(using: &rng)! : UInt8.random(in: 0...255, using: &rng)
                    b[Int.random(in: 0..<b.count, using: &rng)] = v
                case 5, 6:  // insert bytes
                    let at = Int.random(in: 0...b.count, using: &rng)
                    b.insert(contentsOf: (0..<Int.random(in: 1...8, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }, at: at)
                case 7:  // delete bytes
                    guard !b.isEmpty else { continue }
                    let at = Int.random(in: 0..<b.count, using: &rng)
                    b.removeSubrange(at..<min(b.count, at + Int.random(in: 1...8, using: &rng)))
                default:  // truncate
                    b.removeLast(Int.random(in: 0...b.count, using: &rng))
                }
            }
            return b
        }

        @Test func theUnmutatedStreamNegotiatesAndEveryRequestIsAccepted() throws {
            let trace = Self.drive(Self.handshake + Self.requests, pieces: [Int.max])
            #expect(trace.violations.isEmpty, "\(trace.violations)")
            let negotiated = try #require(trace.negotiated)
            #expect(negotiated.structuredReplies && negotiated.baseAllocation)
            #expect(trace.end == .requestsNeedMore)
            #expect(trace.events.count == 8)
            for event in trace.events {
                guard case .request(_, _, .success) = event else {
                    Issue.record("refused: \(event)")
                    continue
                }
            }
            #expect(Self.drive(Self.handshake + Self.requests, pieces: [1]) == trace)
        }

        @Test func randomMutationsAlwaysEndInADefinedState() {
            let count = getenv("PARLEY_BLOCK_MUTATIONS").flatMap { Int(String(cString: $0)) } ?? 20000
            let seed: UInt64 = 0x5EED_B10C_4E42_4400
            let original = Self.handshake + Self.requests
            var ends: [String: Int] = [:]
            var accepted = 0, refused = 0, oversized = 0, failures = 0
            for variant in 0..<count {
                var rng = SplitMix(seed: seed ^ UInt64(variant))
                let input = Self.mutate(original, rng: &rng)
                let pieces = (0..<4).map { _ in Int.random(in: 1...40, using: &rng) }
                let whole = Self.drive(input, pieces: [Int.max])
                let chunked = Self.drive(input, pieces: pieces)
                let problems = whole.violations + chunked.violations + (whole == chunked ? [] : ["fed in pieces \(pieces) it ended differently"])
                if !problems.isEmpty {
                    failures += 1
                    let hex = input.map { String($0, radix: 16) }.joined(separator: " ")
                    Issue.record("variant \(variant) (seed \(seed)): \(problems)\ninput: \(hex)")
                    if failures >= 5 { break }
                }
                switch whole.end {
                case .handshakeNeedsMore: ends["handshake needs more", default: 0] += 1
                case .disconnected: ends["disconnected", default: 0] += 1
                case .requestsNeedMore: ends["requests need more", default: 0] += 1
                case .badMagic: ends["bad magic", default: 0] += 1
                }
                for e in whole.events {
                    switch e {
                    case .oversized: oversized += 1
                    case .request(_, _, .success): accepted += 1
                    case .request(_, _, .failure): refused += 1
                    }
                }
            }
            // The variants reach every outcome (not only the first bytes' checks).
            if count >= 5000 {
                #expect(ends.count == 4, "\(ends)")
                #expect(accepted > 0 && refused > 0 && oversized > 0, "accepted \(accepted), refused \(refused), oversized \(oversized)")
            }
        }
    }
}
