import NIOCore

/// What the handshake tells a client about an export (NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE).
public struct NBDExportInfo: Sendable, Equatable {
    public var name: String
    public var description: String
    public var size: UInt64
    public var flags: NBD.TransmissionFlags
    public var minimumBlockSize: UInt32
    public var preferredBlockSize: UInt32
    public var maximumPayload: UInt32

    public init(name: String, description: String = "", size: UInt64, flags: NBD.TransmissionFlags,
                minimumBlockSize: UInt32 = 1, preferredBlockSize: UInt32 = 4096, maximumPayload: UInt32 = 32 << 20) {
        self.name = name
        self.description = description
        self.size = size
        self.flags = flags
        self.minimumBlockSize = minimumBlockSize
        self.preferredBlockSize = preferredBlockSize
        self.maximumPayload = maximumPayload
    }
}

/// Why an export cannot be listed, described or opened: the option reply to send and a
/// message for the client (sent as the error reply's text) and the log.
public struct NBDRefusal: Error, Sendable, Equatable {
    public var reply: NBD.Reply
    public var message: String
    public init(_ reply: NBD.Reply, _ message: String) {
        self.reply = reply
        self.message = message
    }
}

/// Where the handshake finds exports. The server implements it over its export catalog;
/// tests implement it over a table.
public protocol NBDExportResolver {
    /// The exports NBD_OPT_LIST shows.
    func listExports() -> [(name: String, description: String)]
    /// Describes an export without opening it (NBD_OPT_INFO, the meta-context options).
    func describe(_ name: String) -> Result<NBDExportInfo, NBDRefusal>
    /// Opens an export for the transmission phase (NBD_OPT_GO, NBD_OPT_EXPORT_NAME).
    mutating func open(_ name: String) -> Result<NBDExportInfo, NBDRefusal>
}

/// What the handshake agreed on, for the transmission phase.
public struct NBDNegotiated: Sendable, Equatable {
    public var export: NBDExportInfo
    public var structuredReplies: Bool
    /// `base:allocation` was selected for this export (NBD_CMD_BLOCK_STATUS allowed).
    public var baseAllocation: Bool
}

/// Whether the server offers TLS (NBD_OPT_STARTTLS), and whether it insists on it.
public enum NBDTLSPolicy: String, Sendable, CaseIterable {
    /// STARTTLS is refused (no certificates).
    case off
    /// STARTTLS is accepted; clients may also go on without it.
    case on
    /// Every option but STARTTLS and ABORT is refused with NBD_REP_ERR_TLS_REQD until TLS
    /// is up; NBD_OPT_EXPORT_NAME (which cannot be refused) ends the connection.
    case require
}


/// The server side of NBD's fixed newstyle handshake, sans-IO: bytes in, actions out.
///
/// Sendable when its resolver is: the NBD server runs `receive(_:)` on a blocking pool, since
/// the resolver may open files there.
///
/// `greeting()` gives the first bytes to send. Each `receive(_:)` consumes what it can of
/// the buffer and returns what to do; bytes after the final option stay in the buffer (they
/// belong to the transmission phase). Every violation ends in `.disconnect` with a reason
/// that names what was wrong; option-level mistakes are answered with an error reply and
/// the handshake goes on, as the protocol asks.
public struct NBDHandshakeStateMachine<Resolver: NBDExportResolver> {
    public enum Action: Equatable, Sendable {
        /// Send these bytes.
        case send(ByteBuffer)
        /// The handshake succeeded: enter the transmission phase.
        case transmission(NBDNegotiated)
        /// Close the connection (after sending anything before this action).
        case disconnect(reason: String)
        /// Flush what was sent, then run TLS on the connection before reading anything else
        /// (NBD_OPT_STARTTLS was acknowledged).
        case startTLS
    }


    enum State {
        case greeting
        case clientFlags
        case options
        case done
    }

    public private(set) var resolver: Resolver
    private var state: State = .greeting
    private var noZeroes = false
    private var structuredReplies = false
    /// The export `NBD_OPT_SET_META_CONTEXT` last selected `base:allocation` for.
    private var metaContextExport: String?
    private var optionCount = 0
    /// Between the STARTTLS acknowledgement and the driver's `tlsStarted()`: read nothing.
    private var pausedForTLS = false
    /// Whether STARTTLS is offered or required (set before the first option).
    public var tls: NBDTLSPolicy = .off
    /// STARTTLS was acknowledged: the rest of the handshake runs inside TLS.
    public private(set) var tlsActive = false

    public init(resolver: Resolver) {
        self.resolver = resolver
    }

    /// The server's first bytes: NBDMAGIC, IHAVEOPT and the handshake flags.
    public mutating func greeting() -> ByteBuffer {
        precondition(self.state == .greeting, "greeting() called twice")
        self.state = .clientFlags
        var out = ByteBuffer()
        out.writeInteger(NBD.initMagic)
        out.writeInteger(NBD.optionMagic)
        out.writeInteger(NBD.flagFixedNewstyle | NBD.flagNoZeroes)
        return out
    }

    public mutating func receive(_ buffer: inout ByteBuffer) -> [Action] {
        var actions: [Action] = []
        loop: while true {
            switch self.state {
            case .greeting:
                return [.disconnect(reason: "client sent bytes before the greeting")]
            case .done:
                break loop
            case .clientFlags:
                guard let flags = buffer.readInteger(as: UInt32.self) else { break loop }
                let known = NBD.clientFlagFixedNewstyle | NBD.clientFlagNoZeroes
                guard flags & ~known == 0 else {
                    self.state = .done
                    actions.append(.disconnect(reason: "unknown client flags 0x\(String(flags, radix: 16))"))
                    break loop
                }
                self.noZeroes = flags & NBD.clientFlagNoZeroes != 0
                if flags & NBD.clientFlagFixedNewstyle == 0 {
                    // The NBD document: the server operates in NOTLS mode unless the client
                    // answered with fixed newstyle. Offered, TLS is then off for this client;
                    // required, the client cannot be served.
                    if self.tls == .require {
                        self.state = .done
                        actions.append(.disconnect(reason: "client did not set NBD_FLAG_C_FIXED_NEWSTYLE, which TLS needs, and this server requires TLS"))
                        break loop
                    }
                    self.tls = .off
                }
                self.state = .options
            case .options:
                guard !self.pausedForTLS, buffer.readableBytes >= 16 else { break loop }
                let start = buffer.readerIndex
                let magic = buffer.getInteger(at: start, as: UInt64.self)!
                let option = buffer.getInteger(at: start + 8, as: UInt32.self)!
                let length = buffer.getInteger(at: start + 12, as: UInt32.self)!
                guard magic == NBD.optionMagic else {
                    self.state = .done
                    actions.append(.disconnect(reason: "bad option magic 0x\(String(magic, radix: 16)) (expected IHAVEOPT)"))
                    break loop
                }
                guard length <= NBD.maxOptionLength else {
                    self.state = .done
                    actions.append(.disconnect(reason: "option \(option) has \(length) bytes of data, more than \(NBD.maxOptionLength)"))
                    break loop
                }
                guard buffer.readableBytes >= 16 + Int(length) else { break loop }
                buffer.moveReaderIndex(forwardBy: 16)
                let data = buffer.readSlice(length: Int(length))!
                self.optionCount += 1
                guard self.optionCount <= NBD.maxOptions else {
                    self.state = .done
                    actions.append(.disconnect(reason: "more than \(NBD.maxOptions) options"))
                    break loop
                }
                if option == NBD.Option.startTLS.rawValue, data.readableBytes == 0, buffer.readableBytes > 0, self.tls != .off, !self.tlsActive {
                    // A client waits for the reply before it starts TLS (the NBD protocol), so
                    // these bytes came in the clear after STARTTLS: read later, they would pass
                    // for bytes protected by TLS (nbdkit's CVE-2021-3716). Nothing is acknowledged.
                    self.state = .done
                    actions.append(.disconnect(reason: "client sent \(buffer.readableBytes) bytes after NBD_OPT_STARTTLS without waiting for its reply"))
                    break loop
                }
                self.handle(option: option, data: data, into: &actions)
            }
        }
        return actions
    }

    /// The driver has put TLS on the connection: options are read again (decrypted).
    public mutating func tlsStarted() {
        self.pausedForTLS = false
    }

    /// The client closed the connection during the handshake.
    public mutating func endOfInput() -> String? {
        switch self.state {
        case .done: return nil
        default:
            self.state = .done
            return "client closed the connection during the handshake"
        }
    }

    // MARK: - Options

    private mutating func handle(option raw: UInt32, data: ByteBuffer, into actions: inout [Action]) {
        if self.tls == .require, !self.tlsActive, raw != NBD.Option.startTLS.rawValue, raw != NBD.Option.abort.rawValue {
            if raw == NBD.Option.exportName.rawValue {
                // No reply is possible to NBD_OPT_EXPORT_NAME but the export's data.
                self.state = .done
                actions.append(.disconnect(reason: "NBD_OPT_EXPORT_NAME before STARTTLS on a server that requires TLS"))
            } else {
                actions.append(.send(Self.reply(raw, .errTLSRequired, text: "this server requires TLS: send NBD_OPT_STARTTLS first")))
            }
            return
        }
        guard let option = NBD.Option(rawValue: raw) else {
            actions.append(.send(Self.reply(raw, .errUnsupported, text: "option \(raw) is not supported")))
            return
        }
        switch option {
        case .exportName:
            let name = String(buffer: data)
            switch self.resolver.open(name) {
            case .failure(let refusal):
                self.state = .done
                actions.append(.disconnect(reason: "NBD_OPT_EXPORT_NAME \"\(name)\": \(refusal.message)"))
            case .success(let resolved):
                let info = self.advertised(resolved)
                var out = ByteBuffer()
                out.writeInteger(info.size)
                out.writeInteger(info.flags.rawValue)
                if !self.noZeroes { out.writeRepeatingByte(0, count: 124) }
                actions.append(.send(out))
                self.finish(resolved, into: &actions)
            }
        case .abort:
            actions.append(.send(Self.reply(raw, .ack)))
            self.state = .done
            actions.append(.disconnect(reason: "client aborted the handshake"))
        case .list:
            guard data.readableBytes == 0 else {
                actions.append(.send(Self.reply(raw, .errInvalid, text: "NBD_OPT_LIST takes no data")))
                return
            }
            var out = ByteBuffer()
            for export in self.resolver.listExports() {
                var payload = ByteBuffer()
                payload.writeInteger(UInt32(export.name.utf8.count))
                payload.writeString(export.name)
                payload.writeString(export.description)
                Self.writeReply(raw, .server, payload: payload, into: &out)
            }
            Self.writeReply(raw, .ack, payload: ByteBuffer(), into: &out)
            actions.append(.send(out))
        case .startTLS:
            if data.readableBytes != 0 {
                actions.append(.send(Self.reply(raw, .errInvalid, text: "NBD_OPT_STARTTLS takes no data")))
            } else if self.tls == .off {
                actions.append(.send(Self.reply(raw, .errUnsupported, text: "this server has no TLS certificate")))
            } else if self.tlsActive {
                actions.append(.send(Self.reply(raw, .errInvalid, text: "TLS is already running")))
            } else {
                actions.append(.send(Self.reply(raw, .ack)))
                self.tlsActive = true
                // Whatever the client chose before TLS is forgotten (the NBD protocol).
                self.structuredReplies = false
                self.metaContextExport = nil
                actions.append(.startTLS)
                // Nothing after this option may be read in the clear.
                self.pausedForTLS = true
            }
        case .info, .go:
            self.handleInfo(option: option, data: data, into: &actions)
        case .structuredReply:
            if data.readableBytes != 0 {
                actions.append(.send(Self.reply(raw, .errInvalid, text: "NBD_OPT_STRUCTURED_REPLY takes no data")))
            } else if self.structuredReplies {
                actions.append(.send(Self.reply(raw, .errInvalid, text: "structured replies are already negotiated")))
            } else {
                self.structuredReplies = true
                actions.append(.send(Self.reply(raw, .ack)))
            }
        case .listMetaContext, .setMetaContext:
            self.handleMetaContext(option: option, data: data, into: &actions)
        case .peekExport, .extendedHeaders:
            actions.append(.send(Self.reply(raw, .errUnsupported, text: "option \(raw) is not supported")))
        }
    }

    private mutating func handleInfo(option: NBD.Option, data: ByteBuffer, into actions: inout [Action]) {
        let raw = option.rawValue
        var data = data
        guard let nameLength = data.readInteger(as: UInt32.self), nameLength <= NBD.maxString,
              let name = data.readString(length: Int(nameLength)),
              let count = data.readInteger(as: UInt16.self), data.readableBytes == Int(count) * 2
        else {
            actions.append(.send(Self.reply(raw, .errInvalid, text: "malformed \(option == .go ? "NBD_OPT_GO" : "NBD_OPT_INFO") request")))
            return
        }
        var requested: Set<UInt16> = []
        for _ in 0..<count { requested.insert(data.readInteger(as: UInt16.self)!) }
        // A GO is served whether or not the client asked for NBD_INFO_BLOCK_SIZE (nbd-client
        // never asks): the sizes are sent anyway, and an unaligned request on an export whose
        // minimum is above 1 fails with EINVAL in transmission, as the NBD document allows.
        let result = option == .go ? self.resolver.open(name) : self.resolver.describe(name)
        switch result {
        case .failure(let refusal):
            actions.append(.send(Self.reply(raw, refusal.reply, text: refusal.message)))
        case .success(let resolved):
            let info = self.advertised(resolved)
            var out = ByteBuffer()
            var export = ByteBuffer()
            export.writeInteger(NBD.Info.export.rawValue)
            export.writeInteger(info.size)
            export.writeInteger(info.flags.rawValue)
            Self.writeReply(raw, .info, payload: export, into: &out)
            if requested.contains(NBD.Info.name.rawValue) {
                var p = ByteBuffer()
                p.writeInteger(NBD.Info.name.rawValue)
                p.writeString(info.name)
                Self.writeReply(raw, .info, payload: p, into: &out)
            }
            if requested.contains(NBD.Info.description.rawValue), !info.description.isEmpty {
                var p = ByteBuffer()
                p.writeInteger(NBD.Info.description.rawValue)
                p.writeString(info.description)
                Self.writeReply(raw, .info, payload: p, into: &out)
            }
            // Block sizes are always sent: a client that did not ask may still use them.
            var sizes = ByteBuffer()
            sizes.writeInteger(NBD.Info.blockSize.rawValue)
            sizes.writeInteger(info.minimumBlockSize)
            sizes.writeInteger(info.preferredBlockSize)
            sizes.writeInteger(info.maximumPayload)
            Self.writeReply(raw, .info, payload: sizes, into: &out)
            Self.writeReply(raw, .ack, payload: ByteBuffer(), into: &out)
            actions.append(.send(out))
            if option == .go { self.finish(resolved, into: &actions) }
        }
    }

    private mutating func handleMetaContext(option: NBD.Option, data: ByteBuffer, into actions: inout [Action]) {
        let raw = option.rawValue
        let set = option == .setMetaContext
        if set { self.metaContextExport = nil }  // replaced even when the option fails
        guard self.structuredReplies else {
            actions.append(.send(Self.reply(raw, .errInvalid, text: "negotiate NBD_OPT_STRUCTURED_REPLY first")))
            return
        }
        var data = data
        guard let nameLength = data.readInteger(as: UInt32.self), nameLength <= NBD.maxString,
              let name = data.readString(length: Int(nameLength)),
              let count = data.readInteger(as: UInt32.self), count <= 1024
        else {
            actions.append(.send(Self.reply(raw, .errInvalid, text: "malformed meta context request")))
            return
        }
        var queries: [String] = []
        for _ in 0..<count {
            guard let length = data.readInteger(as: UInt32.self), length <= NBD.maxString,
                  let query = data.readString(length: Int(length)) else {
                actions.append(.send(Self.reply(raw, .errInvalid, text: "malformed meta context query")))
                return
            }
            queries.append(query)
        }
        guard data.readableBytes == 0 else {
            actions.append(.send(Self.reply(raw, .errInvalid, text: "meta context request has \(data.readableBytes) trailing bytes")))
            return
        }
        if case .failure(let refusal) = self.resolver.describe(name) {
            actions.append(.send(Self.reply(raw, refusal.reply, text: refusal.message)))
            return
        }
        // Zero queries: LIST shows everything, SET selects nothing. A namespace alone
        // ("base:") lists its contexts, and SET ignores it, as the NBD document requires.
        let matches = queries.isEmpty ? !set : queries.contains { $0 == NBD.baseAllocation || (!set && $0 == "base:") }
        var out = ByteBuffer()
        if matches {
            var p = ByteBuffer()
            p.writeInteger(set ? NBD.baseAllocationID : 0)
            p.writeString(NBD.baseAllocation)
            Self.writeReply(raw, .metaContext, payload: p, into: &out)
            if set { self.metaContextExport = name }
        }
        Self.writeReply(raw, .ack, payload: ByteBuffer(), into: &out)
        actions.append(.send(out))
    }

    /// The export as announced on this connection: `NBD_FLAG_SEND_DF` is added once structured
    /// replies are negotiated (the NBD document: it MUST NOT be set without them). Reads are
    /// never fragmented, so the flag is always honoured. Transmission gets the resolver's export
    /// as it was (its checks of DF look at the negotiated structured replies).
    private func advertised(_ info: NBDExportInfo) -> NBDExportInfo {
        guard self.structuredReplies else { return info }
        var info = info
        info.flags.insert(.sendDF)
        return info
    }

    private mutating func finish(_ info: NBDExportInfo, into actions: inout [Action]) {
        self.state = .done
        actions.append(.transmission(NBDNegotiated(
            export: info, structuredReplies: self.structuredReplies,
            baseAllocation: self.structuredReplies && self.metaContextExport == info.name
        )))
    }

    // MARK: - Encoding

    static func writeReply(_ option: UInt32, _ type: NBD.Reply, payload: ByteBuffer, into out: inout ByteBuffer) {
        out.writeInteger(NBD.replyMagic)
        out.writeInteger(option)
        out.writeInteger(type.rawValue)
        out.writeInteger(UInt32(payload.readableBytes))
        var payload = payload
        out.writeBuffer(&payload)
    }

    static func reply(_ option: UInt32, _ type: NBD.Reply, text: String = "") -> ByteBuffer {
        var out = ByteBuffer()
        self.writeReply(option, type, payload: ByteBuffer(string: text), into: &out)
        return out
    }
}

extension NBDHandshakeStateMachine: Sendable where Resolver: Sendable {}
