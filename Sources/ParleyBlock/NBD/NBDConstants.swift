/// Numbers of the NBD protocol (NetworkBlockDevice/nbd, doc/proto.md). Only the values this
/// server sends or understands are named.
public enum NBD {
    // Handshake magics.
    public static let initMagic: UInt64 = 0x4e42_444d_4147_4943  // "NBDMAGIC"
    public static let optionMagic: UInt64 = 0x4948_4156_454f_5054  // "IHAVEOPT"
    public static let replyMagic: UInt64 = 0x0003_e889_0455_65a9
    // Transmission magics.
    public static let requestMagic: UInt32 = 0x2560_9513
    public static let simpleReplyMagic: UInt32 = 0x6744_6698
    public static let structuredReplyMagic: UInt32 = 0x668e_33ef

    /// Handshake flags (server) and client flags.
    public static let flagFixedNewstyle: UInt16 = 1 << 0
    public static let flagNoZeroes: UInt16 = 1 << 1
    public static let clientFlagFixedNewstyle: UInt32 = 1 << 0
    public static let clientFlagNoZeroes: UInt32 = 1 << 1

    /// Transmission flags.
    public struct TransmissionFlags: OptionSet, Sendable, Hashable {
        public let rawValue: UInt16
        public init(rawValue: UInt16) { self.rawValue = rawValue }
        public static let hasFlags = Self(rawValue: 1 << 0)
        public static let readOnly = Self(rawValue: 1 << 1)
        public static let sendFlush = Self(rawValue: 1 << 2)
        public static let sendFUA = Self(rawValue: 1 << 3)
        public static let rotational = Self(rawValue: 1 << 4)
        public static let sendTrim = Self(rawValue: 1 << 5)
        public static let sendWriteZeroes = Self(rawValue: 1 << 6)
        public static let sendDF = Self(rawValue: 1 << 7)
        public static let canMultiConn = Self(rawValue: 1 << 8)
        public static let sendCache = Self(rawValue: 1 << 10)
        public static let sendFastZero = Self(rawValue: 1 << 11)
    }

    public enum Option: UInt32, Sendable {
        case exportName = 1, abort = 2, list = 3, peekExport = 4, startTLS = 5, info = 6, go = 7
        case structuredReply = 8, listMetaContext = 9, setMetaContext = 10, extendedHeaders = 11
    }

    public enum Reply: UInt32, Sendable {
        case ack = 1, server = 2, info = 3, metaContext = 4
        case errUnsupported = 0x8000_0001, errPolicy = 0x8000_0002, errInvalid = 0x8000_0003
        case errPlatform = 0x8000_0004, errTLSRequired = 0x8000_0005, errUnknown = 0x8000_0006
        case errShutdown = 0x8000_0007, errBlockSizeRequired = 0x8000_0008, errTooBig = 0x8000_0009
    }

    public enum Info: UInt16, Sendable {
        case export = 0, name = 1, description = 2, blockSize = 3
    }

    public enum Command: UInt16, Sendable {
        case read = 0, write = 1, disconnect = 2, flush = 3, trim = 4, cache = 5, writeZeroes = 6, blockStatus = 7
    }

    public struct CommandFlags: OptionSet, Sendable, Hashable {
        public let rawValue: UInt16
        public init(rawValue: UInt16) { self.rawValue = rawValue }
        public static let fua = Self(rawValue: 1 << 0)
        public static let noHole = Self(rawValue: 1 << 1)
        public static let dontFragment = Self(rawValue: 1 << 2)
        public static let reqOne = Self(rawValue: 1 << 3)
        public static let fastZero = Self(rawValue: 1 << 4)
        public static let all: Self = [.fua, .noHole, .dontFragment, .reqOne, .fastZero]
    }

    public enum ReplyType: UInt16, Sendable {
        case none = 0, offsetData = 1, offsetHole = 2, blockStatus = 5
        case error = 0x8001, errorOffset = 0x8002
    }
    public static let replyFlagDone: UInt16 = 1 << 0

    /// Error values (errno-like) carried in replies.
    public enum Errno: UInt32, Sendable {
        case ok = 0, perm = 1, io = 5, nomem = 12, inval = 22, nospc = 28, overflow = 75, notsup = 95, shutdown = 108
    }

    /// `base:allocation` status flags.
    public static let stateHole: UInt32 = 1 << 0
    public static let stateZero: UInt32 = 1 << 1
    public static let baseAllocation = "base:allocation"
    /// The metadata context id this server gives `base:allocation`.
    public static let baseAllocationID: UInt32 = 1

    /// Longest string (export name, query) the protocol allows.
    public static let maxString = 4096
    /// Longest option payload this server reads (names and queries fit easily).
    public static let maxOptionLength: UInt32 = 64 * 1024
    /// Most options one connection may send before choosing an export.
    public static let maxOptions = 256
    public static let requestHeaderSize = 28
}
